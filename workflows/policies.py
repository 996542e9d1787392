"""SetPolicy: change the policy of a level, validated against the levels above, with a dry run.

The new policy is compared with the effective policy of the levels above: anything that would
loosen it is refused, every conflict listed, nothing changed. Applied, the level's policy version
goes up by one, so no decision cached under the old version is ever used again; children whose own
policies now loosen it are reported (the stricter effective policy applies to them at once, since
every level enforces its own rules). The dry run reports the same and the running agents the new
policy would refuse, and changes nothing.
"""

from __future__ import annotations

from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    import pydantic

    from tetrarch.decisions import ChainLink, agents_refused, conflicts, effective
    from tetrarch.errors import InvalidRequest, PolicyConflict
    from tetrarch.level import ReconfigureChild, SetPolicy
    from tetrarch.models import LevelRef, LevelView
    from tetrarch.names import Level
    from tetrarch.operations import PolicyChangeResult, SetPolicyRequest
    from tetrarch.policy import Policy, template
    from tetrarch.resources import Resources

from workflows import steps
from workflows.common import DOMAIN_KEY, OPERATION_KEY, to_application_error
from workflows.level_ops import request_id


def target_of(req: SetPolicyRequest) -> LevelRef:
    """The level a request names: global, a domain, or a supervisor."""
    if req.supervisor is not None:
        if req.domain is None:
            raise to_application_error(InvalidRequest("a supervisor's policy needs its domain", level="client"))
        return LevelRef.supervisor(req.domain, req.supervisor)
    return LevelRef.manager(req.domain) if req.domain is not None else LevelRef.orchestrator()


def _link(view: LevelView, policy: Policy | None = None) -> ChainLink:
    return ChainLink(level=view.level.value, entity=view.id, policy=policy or view.policy,
                     capacity=view.pool.capacity, agents=view.agents)


@workflow.defn(name="SetPolicy", failure_exception_types=[pydantic.ValidationError])
class SetPolicyWorkflow:
    """Set (or dry-run) a level's policy."""

    @workflow.run
    async def run(self, req: SetPolicyRequest) -> PolicyChangeResult:
        attrs = [OPERATION_KEY.value_set("SetPolicy")]
        if req.domain is not None:
            attrs.append(DOMAIN_KEY.value_set(req.domain))
        workflow.upsert_search_attributes(attrs)
        target = target_of(req)
        if (req.policy is None) == (req.template is None):
            raise to_application_error(InvalidRequest("give either a policy or a template", level="client"))
        try:
            new = req.policy or template(req.template or "", target.level.value)
        except ValueError as e:
            raise to_application_error(InvalidRequest(str(e), level="client")) from None
        above = [LevelRef.orchestrator()] if target.level is not Level.ORCHESTRATOR else []
        if target.level is Level.SUPERVISOR:
            assert target.domain is not None
            above.append(LevelRef.manager(target.domain))
        views = await steps.gather(*(steps.describe_level(ref) for ref in [*above, target]))
        above_views, mine = list(views[:-1]), views[-1]
        parent_effective = effective([_link(v) for v in above_views])
        found = conflicts(new, mine.pool.capacity, parent_effective)
        if found and not req.dry_run:
            raise to_application_error(PolicyConflict(
                f"the policy for {target.describe()} would loosen what the levels above enforce "
                f"({len(found)} conflict(s)); nothing changed", level=target.level.value, entity=target.entity_id,
                problems=found))
        new_link = _link(mine, new)
        in_force = effective([*(_link(v) for v in above_views), new_link])
        children = [c.name for c in mine.children if target.level is not Level.SUPERVISOR
                    and conflicts(c.policy, c.resources, in_force)]
        refused = agents_refused(new_link, await self._agents_below(target, mine))
        result = PolicyChangeResult(target=target.entity_id, applied=False, dry_run=req.dry_run, policy=new,
                                    previous_version=mine.policy.version, conflicts=found,
                                    children_in_conflict=children, agents_refused=refused)
        if req.dry_run:
            return result
        rid = request_id(req.request_id)
        result.policy = await steps.set_policy(target, SetPolicy(request_id=rid, policy=new))
        result.applied = result.policy.version != mine.policy.version
        if above_views and result.applied:  # keep the parent's record of its child's policy in step
            parent = above[-1]
            await steps.reconfigure_child(parent, ReconfigureChild(
                request_id=rid, name=mine.name, policy=result.policy))
        return result

    @staticmethod
    async def _agents_below(target: LevelRef, view: LevelView) -> list[tuple[str, Resources]]:
        """Every running agent under ``target`` with its slice (supervisors read in parallel)."""
        if target.level is Level.SUPERVISOR:
            return [(f"{view.domain}/{c.name}", c.resources) for c in view.children]
        if target.level is Level.MANAGER:
            sups = [LevelRef.supervisor(view.name, c.name) for c in view.children]
        else:
            managers = await steps.gather(*(steps.describe_level(LevelRef.manager(c.name))
                                              for c in view.children))
            sups = [LevelRef.supervisor(m.name, c.name) for m in managers for c in m.children]
        sup_views = await steps.gather(*(steps.describe_level(s) for s in sups))
        return [(f"{v.domain}/{c.name}", c.resources) for v in sup_views for c in v.children]
