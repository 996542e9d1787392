"""Resource vectors: quantity parsing and formatting, exact arithmetic, fit and shortfall."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from tetrarch.resources import Resources, format_cpu, format_memory, parse_cpu, parse_memory, total

# Values up to 10**15 (a million million cores, ~1 ZiB of memory) are far beyond any real pool and
# still exactly representable by the float parser used for decimal quantities.
BIG = 10**15
amounts = st.integers(min_value=0, max_value=BIG)
vectors = st.builds(Resources, cpu_millis=amounts, memory_mib=amounts, gpu=st.integers(min_value=0, max_value=10**6))


# -- parsing ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "millis"),
    [
        (0, 0),
        (1, 1000),
        (2, 2000),
        (0.5, 500),
        (1.25, 1250),
        ("2", 2000),
        ("0.5", 500),
        ("500m", 500),
        ("1500m", 1500),
        ("0m", 0),
        (" 3 ", 3000),
        ("250 m", 250),
        (1000, 1_000_000),
    ],
)
def test_parse_cpu_valid(value, millis):
    assert parse_cpu(value) == millis


@pytest.mark.parametrize(
    "value",
    [-1, -0.5, "-1", "-500m", "abc", "", "m", "1.2.3", "1e3", "2 cores", "5M", "1Gi", True, False,
     None, [1], {"cpu": 1}, float("inf"), float("-inf"), float("nan")],
)
def test_parse_cpu_invalid(value):
    with pytest.raises(ValueError, match="cpu"):
        parse_cpu(value)


@pytest.mark.parametrize(
    ("value", "mib"),
    [
        (0, 0),
        (512, 512),
        ("512", 512),
        ("512Mi", 512),
        ("1Gi", 1024),
        ("10Gi", 10 * 1024),
        ("1.5Gi", 1536),
        ("1Ti", 1024 * 1024),
        ("1024Ki", 1),
        ("1GiB", 1024),
        (" 2 Gi ", 2048),
        ("1G", round(1000**3 / 1024**2)),
        ("1M", round(1000**2 / 1024**2)),
        ("1T", round(1000**4 / 1024**2)),
    ],
)
def test_parse_memory_valid(value, mib):
    assert parse_memory(value) == mib


@pytest.mark.parametrize(
    "value",
    [-1, -0.5, "-1Gi", "lots", "", "Gi", "1gi", "1Pi", "1 Gi Gi", "10Gb5", "100B", "500m", True, False,
     None, [1], float("inf"), float("nan")],
)
def test_parse_memory_invalid(value):
    with pytest.raises(ValueError, match="memory"):
        parse_memory(value)


# -- formatting -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("millis", "text"), [(0, "0"), (1000, "1"), (500, "500m"), (1500, "1500m"),
                                              (1_000_000, "1000"), (1, "1m")])
def test_format_cpu(millis, text):
    assert format_cpu(millis) == text


@pytest.mark.parametrize(("mib", "text"), [(0, "0Mi"), (1, "1Mi"), (512, "512Mi"), (1024, "1Gi"),
                                           (1536, "1536Mi"), (10 * 1024, "10Gi"), (1024 * 1024, "1Ti"),
                                           (3 * 1024 * 1024, "3Ti"), (1024 * 1024 + 1024, "1025Gi")])
def test_format_memory(mib, text):
    assert format_memory(mib) == text


def test_human():
    assert Resources.of(cpu=10, memory="10Gi", gpu=2).human() == "10 CPU / 10Gi / 2 GPU"
    assert Resources.of(cpu="500m", memory=300).human() == "500m CPU / 300Mi / 0 GPU"


@given(amounts)
def test_cpu_parse_format_roundtrip(x):
    assert parse_cpu(format_cpu(x)) == x


@given(amounts)
def test_memory_parse_format_roundtrip(x):
    assert parse_memory(format_memory(x)) == x


@given(vectors)
def test_resources_roundtrip_through_human_quantities(r):
    again = Resources.model_validate({"cpu": format_cpu(r.cpu_millis), "memory": format_memory(r.memory_mib),
                                      "gpu": r.gpu})
    assert again == r


# -- the model --------------------------------------------------------------------------------------


def test_model_validate_quantities():
    r = Resources.model_validate({"cpu": 2, "memory": "4Gi"})
    assert r == Resources(cpu_millis=2000, memory_mib=4096, gpu=0)
    assert Resources.model_validate({"cpu": "250m"}) == Resources(cpu_millis=250)
    assert Resources.model_validate({"memory": "1Ti", "gpu": 1}) == Resources(memory_mib=1024 * 1024, gpu=1)


def test_model_validate_canonical_and_dump():
    r = Resources.model_validate({"cpu_millis": 1500, "memory_mib": 2048, "gpu": 1})
    assert r.model_dump() == {"cpu_millis": 1500, "memory_mib": 2048, "gpu": 1}
    assert Resources.model_validate_json(r.model_dump_json()) == r
    assert Resources.model_validate_json('{"cpu": "1500m", "memory": "2Gi", "gpu": 1}') == r


def test_of_matches_model_validate():
    assert Resources.of(cpu=10, memory="10Gi") == Resources.model_validate({"cpu": 10, "memory": "10Gi"})
    assert Resources.of() == Resources()
    assert Resources().is_zero()
    assert not Resources(gpu=1).is_zero()


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"cpu": 1, "cpu_millis": 1000}, "cpu"),
        ({"memory": "1Gi", "memory_mib": 1024}, "memory"),
    ],
)
def test_refuses_both_quantity_and_canonical(data, field):
    with pytest.raises(ValidationError) as exc:
        Resources.model_validate(data)
    errors = exc.value.errors()
    assert [e["loc"] for e in errors] == [(field,)]
    assert "not both" in errors[0]["msg"]


def test_extra_fields_refused():
    with pytest.raises(ValidationError) as exc:
        Resources.model_validate({"cpu": 1, "disk": "10Gi"})
    assert [e["loc"] for e in exc.value.errors()] == [("disk",)]
    assert exc.value.errors()[0]["type"] == "extra_forbidden"
    with pytest.raises(ValidationError):
        Resources.model_validate({"cpu_millis": 1, "cores": 1})


@pytest.mark.parametrize(
    ("data", "loc"),
    [
        ({"cpu": -1}, ("cpu",)),
        ({"cpu": "lots"}, ("cpu",)),
        ({"cpu": True}, ("cpu",)),
        ({"cpu": float("inf")}, ("cpu",)),
        ({"memory": "-1Gi"}, ("memory",)),
        ({"memory": "ten"}, ("memory",)),
        ({"memory": False}, ("memory",)),
        ({"cpu_millis": -1}, ("cpu_millis",)),
        ({"memory_mib": -1}, ("memory_mib",)),
        ({"gpu": -1}, ("gpu",)),
        ({"cpu_millis": 1.5}, ("cpu_millis",)),
        ({"gpu": "two"}, ("gpu",)),
    ],
)
def test_invalid_fields_name_their_path(data, loc):
    with pytest.raises(ValidationError) as exc:
        Resources.model_validate(data)
    assert [e["loc"] for e in exc.value.errors()] == [loc]


def test_every_bad_quantity_is_reported():
    with pytest.raises(ValidationError) as exc:
        Resources.model_validate({"cpu": "-1", "memory": "lots"})
    assert sorted(e["loc"] for e in exc.value.errors()) == [("cpu",), ("memory",)]


def test_frozen():
    r = Resources.of(cpu=1)
    with pytest.raises(ValidationError):
        r.cpu_millis = 5  # type: ignore[misc]
    assert r.cpu_millis == 1000


# -- arithmetic -------------------------------------------------------------------------------------


def test_add_and_minus():
    a = Resources.of(cpu=2, memory="4Gi", gpu=1)
    b = Resources.of(cpu="500m", memory="1Gi")
    assert a + b == Resources(cpu_millis=2500, memory_mib=5120, gpu=1)
    assert a.minus(b) == Resources(cpu_millis=1500, memory_mib=3072, gpu=1)
    assert a.minus(a).is_zero()


@pytest.mark.parametrize("other", [Resources(cpu_millis=2001), Resources(memory_mib=4097), Resources(gpu=2)])
def test_minus_refuses_negative(other):
    a = Resources.of(cpu=2, memory="4Gi", gpu=1)
    with pytest.raises(ValueError, match="cannot subtract"):
        a.minus(other)


def test_total():
    assert total([]) == Resources()
    items = [Resources.of(cpu=1, memory="1Gi")] * 3 + [Resources(gpu=2)]
    assert total(items) == Resources(cpu_millis=3000, memory_mib=3072, gpu=2)


def test_fits_in_is_componentwise():
    pool = Resources.of(cpu=10, memory="10Gi", gpu=1)
    assert Resources.of(cpu=10, memory="10Gi", gpu=1).fits_in(pool)
    assert Resources().fits_in(pool)
    assert not Resources.of(cpu=11).fits_in(pool)
    assert not Resources.of(memory="11Gi").fits_in(pool)
    assert not Resources(gpu=2).fits_in(pool)
    # more of one, less of another: does not fit either way
    x, y = Resources.of(cpu=2, memory="1Gi"), Resources.of(cpu=1, memory="2Gi")
    assert not x.fits_in(y)
    assert not y.fits_in(x)


def test_shortfall():
    pool = Resources.of(cpu=10, memory="10Gi", gpu=0)
    assert Resources.of(cpu=10, memory="10Gi").shortfall(pool) == {}
    short = Resources.of(cpu="10500m", memory="20Gi", gpu=1).shortfall(pool)
    assert short == {"cpu": "needs 10500m, has 10", "memory": "needs 20Gi, has 10Gi", "gpu": "needs 1, has 0"}
    assert Resources.of(memory="11Gi").shortfall(pool) == {"memory": "needs 11Gi, has 10Gi"}


@given(vectors, vectors)
def test_add_then_minus_is_identity(a, b):
    assert (a + b).minus(b) == a
    assert (a + b).minus(a) == b
    assert a + b == b + a


@given(vectors, vectors)
def test_fits_and_shortfall_agree(a, b):
    assert a.fits_in(b) == (a.shortfall(b) == {})
    assert a.fits_in(a + b)
    if a.fits_in(b):
        assert a + b.minus(a) == b
    else:
        with pytest.raises(ValueError):
            b.minus(a)
