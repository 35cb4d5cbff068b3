"""The readers' open step on mutated real files: every input is accepted or rejected with a FlashLMError (whose
message names the byte offset, for GGUF and .flash); none crashes, hangs or allocates without bound. A short run
of labs.fuzz_parsers (the full one: `python -m labs.fuzz_parsers --parser P --inputs 100000`)."""

from __future__ import annotations

import time

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from flashlm.errors import FlashLMError
from labs.fuzz_parsers import TARGETS, fuzz

INPUTS = {"gguf": 2000, "flash": 1500, "hf": 1500}
PER_INPUT_TIMEOUT_S = 2.0  # an input still open after this is a hang (a finding)


@pytest.mark.parametrize("parser", sorted(INPUTS))
def test_parser_survives_mutations(parser, smollm_path):
    t0 = time.perf_counter()
    report = fuzz(parser, INPUTS[parser], seed=1234, src_path=smollm_path, timeout_s=PER_INPUT_TIMEOUT_S)
    elapsed = time.perf_counter() - t0
    print("\n".join(report.lines()))
    assert report.tried == INPUTS[parser]
    assert not report.findings, report.findings[:5]
    assert sum(report.rejected.values()) > INPUTS[parser] // 2  # the mutations do reach the checks
    if parser != "hf":
        assert not report.no_offset, report.no_offset.most_common(3)
    assert elapsed < 40, f"{INPUTS[parser]} inputs took {elapsed:.0f} s"


# The same mutators driven by hypothesis (its Random is recorded, so a failure shrinks to a small mutation list).
@pytest.fixture(scope="module", params=sorted(INPUTS))
def target(request, smollm_path, tmp_path_factory):
    return TARGETS[request.param](str(tmp_path_factory.mktemp(f"hyp-{request.param}")), smollm_path)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rng=st.randoms(use_true_random=False), i=st.integers(0, 79))
def test_mutations_under_hypothesis(target, rng, i):
    what = target.make_input(rng, i)
    try:
        target.open()
    except FlashLMError:
        pass
    except Exception as e:  # noqa: BLE001 - anything else is the finding this test exists to report
        raise AssertionError(f"{what}: {type(e).__name__}: {e}") from e
