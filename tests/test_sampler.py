"""The sampler chain on hand-made logits: each stage does what llama.cpp's stage does, draws are seeded."""

from __future__ import annotations

import numpy as np
import pytest

from flashlm.errors import InvalidOptionError
from flashlm.options import SamplingOptions
from flashlm.runtime.sampler import SamplerScratch, apply_repeat_penalty, filter_candidates, make_sampler, top_k_ids

LOGITS = np.log(np.array([0.5, 0.2, 0.15, 0.1, 0.05], dtype=np.float32))


def test_greedy_is_argmax():
    s = make_sampler(SamplingOptions(temperature=0.0))
    assert s(np.array([0.1, 3.0, 2.0]), []) == 1


def test_repeat_penalty_divides_positive_and_multiplies_negative():
    out = apply_repeat_penalty(np.array([2.0, -2.0, 1.0]), [0, 1, 1], penalty=2.0, last_n=64)
    np.testing.assert_allclose(out, [1.0, -4.0, 1.0])
    # only the last_n tokens count
    out = apply_repeat_penalty(np.array([2.0, -2.0, 1.0]), [0, 1], penalty=2.0, last_n=1)
    np.testing.assert_allclose(out, [2.0, -4.0, 1.0])


def test_repeat_penalty_changes_the_greedy_choice():
    s = make_sampler(SamplingOptions(temperature=0.0, repeat_penalty=4.0))
    assert s(np.array([2.0, 1.0]), [0]) == 1


def test_top_k_keeps_k_best():
    ids, _ = filter_candidates(LOGITS, top_k=2, top_p=1.0, min_p=0.0)
    assert list(ids) == [0, 1]


def test_top_p_keeps_smallest_prefix_reaching_p():
    ids, _ = filter_candidates(LOGITS, top_k=0, top_p=0.8, min_p=0.0)
    assert list(ids) == [0, 1, 2]  # 0.5 + 0.2 = 0.7 < 0.8 <= 0.85
    ids, _ = filter_candidates(LOGITS, top_k=0, top_p=0.7, min_p=0.0)
    assert list(ids) == [0, 1]


def test_min_p_drops_tokens_below_fraction_of_best():
    ids, _ = filter_candidates(LOGITS, top_k=0, top_p=1.0, min_p=0.29)  # keep p >= 0.145
    assert list(ids) == [0, 1, 2]


def test_same_seed_same_draws_and_frequencies_follow_probabilities():
    opts = SamplingOptions(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=1234)
    a, b = make_sampler(opts), make_sampler(opts)
    draws_a = [a(LOGITS, []) for _ in range(4000)]
    assert draws_a == [b(LOGITS, []) for _ in range(4000)]
    freq = np.bincount(draws_a, minlength=5) / len(draws_a)
    np.testing.assert_allclose(freq, np.exp(LOGITS), atol=0.03)
    other = make_sampler(SamplingOptions(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=99))
    assert [other(LOGITS, []) for _ in range(200)] != draws_a[:200]


def test_low_temperature_sharpens():
    cold = make_sampler(SamplingOptions(temperature=0.05, top_k=0, top_p=1.0, min_p=0.0, seed=0))
    assert all(cold(LOGITS, []) == 0 for _ in range(200))


@pytest.mark.parametrize("bad", [dict(temperature=-1.0), dict(top_p=1.5), dict(min_p=-0.1), dict(top_k=-3),
                                 dict(repeat_penalty=0.0), dict(seed=-5), dict(temperature=float("nan"))])
def test_invalid_values_raise_typed_error(bad):
    with pytest.raises(InvalidOptionError):
        SamplingOptions(**bad).validate()


def test_top_k_matches_a_full_sort_on_real_sized_logits():
    """top_k_ids partitions a reused copy; the survivors and their order are those of a full stable sort, ties at
    the k-th value included (the lower ids kept), over several calls on one scratch."""
    rng = np.random.default_rng(7)
    scratch = SamplerScratch()
    for n, k in ((49152, 40), (262144, 40), (1000, 1), (1000, 999)):
        logits = np.round(rng.standard_normal(n) * 3, 1).astype(np.float32)  # rounded: many ties
        ids, vals = filter_candidates(logits, top_k=k, top_p=1.0, min_p=0.0, scratch=scratch)
        want = np.argsort(-logits, kind="stable")[:k]
        assert list(ids) == list(want) and np.array_equal(vals, logits[want])
    assert list(top_k_ids(np.array([1.0, 3.0, 3.0, 2.0]), 2)) == [1, 2]
    assert list(top_k_ids(np.array([1.0, 3.0, 2.0, 3.0]), 1)) == [1, 3]  # a tie at the k-th value: both


def test_repeat_penalty_in_scratch_leaves_the_logits_untouched():
    logits = np.array([2.0, -2.0, 1.0], np.float32)
    scratch = SamplerScratch()
    out = apply_repeat_penalty(logits, [0, 1], penalty=2.0, last_n=64, scratch=scratch)
    np.testing.assert_allclose(out, [1.0, -4.0, 1.0])
    np.testing.assert_allclose(logits, [2.0, -2.0, 1.0])
    again = apply_repeat_penalty(logits, [2], penalty=2.0, last_n=64, scratch=scratch)
    assert again is out  # the same buffer, refilled from the logits
    np.testing.assert_allclose(again, [2.0, -2.0, 0.5])
