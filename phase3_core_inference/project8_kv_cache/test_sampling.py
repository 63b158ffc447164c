"""Each sampling step against the matching `transformers` logits processor, on fresh random logits.

Run: uv run pytest -q phase3_core_inference/project8_kv_cache/test_sampling.py
"""

from __future__ import annotations

import pytest
import torch

from course.errors import ConfigError
from phase3_core_inference.project8_kv_cache.sampling import (SamplingParams, apply_repetition_penalty,
                                                              apply_temperature, min_p_filter, process_logits,
                                                              sample_token, top_k_filter, top_p_filter)

lp = pytest.importorskip("transformers.generation.logits_process", reason="transformers (dev group) is needed")

B, V = 4, 1000


def logits_and_ids(seed: int, scale: float = 3.0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, V, generator=g) * scale
    ids = torch.randint(0, V, (B, 37), generator=g)  # with repeats: a token is penalised once
    return logits, ids


def same(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    assert torch.equal(torch.isinf(ours), torch.isinf(theirs)), "different tokens were filtered out"
    finite = ~torch.isinf(theirs)
    torch.testing.assert_close(ours[finite], theirs[finite], rtol=0, atol=1e-6)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("penalty", [0.7, 1.3, 2.0])
def test_repetition_penalty_matches_transformers(seed, penalty):
    logits, ids = logits_and_ids(seed)
    theirs = lp.RepetitionPenaltyLogitsProcessor(penalty)(ids, logits.clone())
    same(apply_repetition_penalty(logits, ids, penalty), theirs)
    assert not torch.equal(theirs, logits)  # the test can fail: something was penalised


@pytest.mark.parametrize("t", [0.3, 0.7, 1.5])
def test_temperature_matches_transformers(t):
    logits, ids = logits_and_ids(10)
    same(apply_temperature(logits, t), lp.TemperatureLogitsWarper(t)(ids, logits.clone()))


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("k", [1, 5, 50, 999])
def test_top_k_matches_transformers(seed, k):
    logits, ids = logits_and_ids(seed)
    out = top_k_filter(logits, k)
    same(out, lp.TopKLogitsWarper(k)(ids, logits.clone()))
    assert (~torch.isinf(out)).sum(-1).eq(k).all()


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("p", [0.05, 0.5, 0.9, 0.99])
def test_top_p_matches_transformers(seed, p):
    logits, ids = logits_and_ids(seed, scale=2.0)
    out = top_p_filter(logits, p)
    same(out, lp.TopPLogitsWarper(p)(ids, logits.clone()))


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("min_p", [0.01, 0.1, 0.5, 1.0])
def test_min_p_matches_transformers(seed, min_p):
    logits, ids = logits_and_ids(seed)
    out = min_p_filter(logits, min_p)
    same(out, lp.MinPLogitsWarper(min_p)(ids, logits.clone()))
    assert (~torch.isinf(out)).sum(-1).ge(1).all()  # the top token always survives


@pytest.mark.parametrize("seed", range(3))
def test_full_pipeline_matches_transformers_order(seed):
    """repetition penalty -> temperature -> top-k -> top-p -> min-p, as a LogitsProcessorList in that order."""
    logits, ids = logits_and_ids(seed)
    params = SamplingParams(temperature=0.8, top_k=100, top_p=0.9, min_p=0.05, repetition_penalty=1.2)
    chain = lp.LogitsProcessorList([lp.RepetitionPenaltyLogitsProcessor(1.2), lp.TemperatureLogitsWarper(0.8),
                                    lp.TopKLogitsWarper(100), lp.TopPLogitsWarper(0.9), lp.MinPLogitsWarper(0.05)])
    same(process_logits(logits, params, ids), chain(ids, logits.clone()))


def test_greedy_is_argmax_after_penalty():
    logits, ids = logits_and_ids(4)
    params = SamplingParams(temperature=0.0, repetition_penalty=1.5)
    expected = lp.RepetitionPenaltyLogitsProcessor(1.5)(ids, logits.clone()).argmax(-1, keepdim=True)
    assert torch.equal(sample_token(logits, params, ids), expected)


def test_seed_makes_sampling_reproducible_and_seeds_differ():
    logits, _ = logits_and_ids(5, scale=0.5)  # flat: draws vary a lot
    params = SamplingParams(temperature=1.0, top_k=500)

    def draws(seed):
        g = torch.Generator().manual_seed(seed)
        return torch.cat([sample_token(logits, params, generator=g) for _ in range(20)], dim=1)

    assert torch.equal(draws(1), draws(1))
    assert not torch.equal(draws(1), draws(2))


def test_sampling_never_picks_a_filtered_token():
    logits, _ = logits_and_ids(6)
    params = SamplingParams(temperature=1.0, top_k=3)
    allowed = torch.topk(logits, 3, dim=-1).indices
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        tok = sample_token(logits, params, generator=g)
        assert (allowed == tok).any(-1).all()


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_p=0.0), dict(top_p=1.5), dict(min_p=2.0),
                                 dict(repetition_penalty=0.0), dict(top_k=-2)])
def test_bad_settings_are_one_clear_error(bad):
    with pytest.raises(ConfigError, match="invalid sampling settings"):
        SamplingParams(**bad).check()


if __name__ == "__main__":
    from course.cli import run_demo

    run_demo(lambda: print("this file holds only tests: uv run pytest -q " + __file__), __doc__)
