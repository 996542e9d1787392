"""How merge and split treat agents' working state and resources (pure; the image declares the rules).

``union`` merges the list at the image's ``split_key`` (first-seen order, no repeats) and lets later
agents' other keys win; ``even`` deals that list out round-robin and copies the other keys to every
part. Resources: a merged agent holds the sum of its originals' spawn allocations; a split divides the
original's evenly (each part must still be able to run). An image that names its own hooks has them
run by the merge and split workflows instead (in the task runtime), never here.
"""

from __future__ import annotations

from typing import Any

from tetrarch.errors import InvalidRequest
from tetrarch.images import StateRules
from tetrarch.resources import KINDS, Resources


def _no_hook(rule: str, what: str) -> None:
    if ":" in rule:
        raise InvalidRequest(f"the image declares a {what} hook ({rule}); only the built-in rules (union, even) "
                             "run here so far", level="supervisor")


def merge_states(states: list[dict[str, Any]], rules: StateRules) -> dict[str, Any]:
    """The working state of a merged agent."""
    _no_hook(rules.merge, "merge")
    out: dict[str, Any] = {}
    items: list[Any] = []
    for state in states:
        for key, value in state.items():
            if key == rules.split_key and isinstance(value, list):
                items += [v for v in value if v not in items]
            else:
                out[key] = value
    if items or any(rules.split_key in s for s in states):
        out[rules.split_key] = items
    return out


def split_state(state: dict[str, Any], rules: StateRules, parts: int) -> list[dict[str, Any]]:
    """The working states of ``parts`` agents made from one: the list dealt out, the rest copied."""
    _no_hook(rules.split, "split")
    items = state.get(rules.split_key, [])
    if not isinstance(items, list):
        raise InvalidRequest(f"state[{rules.split_key!r}] is not a list; it cannot be split evenly",
                             level="supervisor")
    rest = {k: v for k, v in state.items() if k != rules.split_key}
    return [{**rest, rules.split_key: items[i::parts]} for i in range(parts)]


def split_resources(total: Resources, parts: int, min_memory_mib: int = 0) -> Resources:
    """Each part's share of ``total`` (rounded down); refused when a part would be too small to run."""
    if parts < 2:
        raise InvalidRequest(f"an agent splits into at least 2 parts, not {parts}", level="supervisor")
    share = Resources(**{k: getattr(total, k) // parts for k in KINDS})
    problems = []
    if total.cpu_millis and share.cpu_millis == 0:
        problems.append(f"cpu: {total.cpu_millis}m cannot be divided {parts} ways")
    if min_memory_mib and share.memory_mib < min_memory_mib:
        problems.append(f"memory: {share.memory_mib}Mi each is below the {min_memory_mib}Mi a task needs")
    if problems:
        raise InvalidRequest(f"{parts} parts are more than the agent's {total.human()} allows: "
                             + "; ".join(problems), level="supervisor", problems=problems)
    return share
