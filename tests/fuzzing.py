"""What the fuzz suites (tests/test_fuzz_*.py) share: their Hypothesis budget, hostile values,
and the promise every case checks.

The default run is derandomized (a fixed seed) with a small budget, so the suite is fast and the
same every time; `pytest --fuzz-long tests/test_fuzz_*.py` (tests/conftest.py) searches with
fresh random seeds and a thousand times the budget, for hours (FASTDDPM_FUZZ_LONG=N: N times)."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from fastddpm.errors import UserError

# how many times the default budget to search, with random seeds: conftest sets 1000 for
# --fuzz-long; FASTDDPM_FUZZ_LONG=N runs any multiple
LONG = int(os.environ.get("FASTDDPM_FUZZ_LONG", "0"))


def budget(examples: int) -> settings:
    """`examples` cases by default (derandomized); LONG times as many, randomly, under --fuzz-long.
    Every case must end within 5 s, the issue's bound on a refusal."""
    return settings(max_examples=examples * LONG if LONG else examples, derandomize=not LONG,
                    deadline=5000, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


# Values a hostile or careless file puts where a config field belongs: every JSON type, the
# edges of integer and float ranges, non-finite numbers, and nesting.
SCALARS = st.one_of(
    st.none(), st.booleans(),
    st.sampled_from([0, 1, 2, 3, 4, 8, 16, 32, -1, -8, 10**9, 10**12, 2**31, 2**63, -(2**63)]),
    st.integers(-2**70, 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.5, 1e-4, 0.02, -0.0, 1e308, 5e-324]),
    st.text(max_size=12),
    st.sampled_from(["linear", "cosine", "fixed_large", "fixed_small", "epsilon", "v_prediction",
                     "", "nan", "1e999"]),
)
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=5),
                                                       st.dictionaries(st.text(max_size=8), inner,
                                                                       max_size=3)),
                      max_leaves=8)


@st.composite
def mutated(draw, valid: dict) -> dict:
    """`valid` with one to three fields replaced by hostile values, removed, or added."""
    out = dict(valid)
    for _ in range(draw(st.integers(1, 3))):
        key = draw(st.one_of(st.sampled_from(sorted(valid)), st.text(max_size=10)) if valid
                   else st.text(max_size=10))
        if key in out and draw(st.integers(0, 4)) == 0:
            del out[key]
        else:
            out[key] = draw(VALUES)
    return out


def refused_in_one_line(call) -> object | None:
    """The promise of an in-process reader: it returns, or raises a UserError of one line. Any
    other exception — a traceback for the user — fails the test that calls this."""
    try:
        return call()
    except UserError as e:
        assert "\n" not in str(e) and str(e), repr(str(e))
        return None


def digest(*paths: Path) -> dict[str, str]:
    """Path → SHA-256 of every file at or under `paths`: what must not change."""
    files = [f for p in paths for f in ([p] if p.is_file() else sorted(p.rglob("*"))) if f.is_file()]
    return {str(f): hashlib.sha256(f.read_bytes()).hexdigest() for f in files}
