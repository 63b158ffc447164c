"""The cache contract (cache_contract.py) on every cache class of this project; later projects add theirs.

Run: uv run pytest -q phase3_core_inference/project8_kv_cache/test_cache_contract.py
"""

from __future__ import annotations

import pytest

from phase3_core_inference.project8_kv_cache import cache_contract
from phase3_core_inference.project8_kv_cache.kv_cache import Cache, KVCache

CACHES = {"contiguous": lambda config, batch, max_len: KVCache.for_model(config, batch=batch, max_len=max_len)}


@pytest.mark.parametrize("check", cache_contract.CHECKS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("name", CACHES)
def test_cache_keeps_the_contract(name, check, tmp_path):
    if check is cache_contract.check_greedy_equals_transformers:
        pytest.importorskip("transformers", reason="transformers (dev group) is needed")
        check(CACHES[name], tmp_dir=tmp_path)
    else:
        check(CACHES[name])


def test_the_caches_implement_the_protocol():
    from phase1_foundation.project3_pretrain.testing import tiny_config
    for make in CACHES.values():
        assert isinstance(make(tiny_config(), 2, 8), Cache)


# ---- the contract can fail: caches with one bug each ---------------------------------------------------
class SharedPositions(KVCache):
    """Bug: every row gets the first row's positions (a single start_pos for the whole batch)."""

    def begin(self, T):
        plan = super().begin(T)
        if plan.positions is None:
            return plan
        return plan._replace(positions=plan.positions[:1].expand_as(plan.positions))


class NoMask(KVCache):
    """Bug: rows of different lengths attend to every slot up to the longest row (stale slots included)."""

    def begin(self, T):
        return super().begin(T)._replace(mask=None) if T == 1 else super().begin(T)


class ForgetsToFree(KVCache):
    """Bug: free() leaves the row's length, so a new sequence appends to the old one's keys."""

    def free(self, row):
        pass


@pytest.mark.parametrize("broken,check", [(SharedPositions, cache_contract.check_ragged_rows_equal_each_alone),
                                          (NoMask, cache_contract.check_ragged_rows_equal_each_alone),
                                          (ForgetsToFree, cache_contract.check_rows_finish_and_join)])
def test_a_broken_cache_fails_the_contract(broken, check):
    with pytest.raises(AssertionError):
        check(lambda config, batch, max_len: broken.for_model(config, batch=batch, max_len=max_len))


if __name__ == "__main__":
    from course.cli import run_demo

    run_demo(lambda: print("this file holds only tests: uv run pytest -q " + __file__), __doc__)
