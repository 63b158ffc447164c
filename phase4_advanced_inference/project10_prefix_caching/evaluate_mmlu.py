"""MMLU 5-shot through project 4's harness twice: as project 4 runs it, and with the model behind a prefix cache.

    uv run python phase4_advanced_inference/project10_prefix_caching/evaluate_mmlu.py --preset cpu
    uv run python phase4_advanced_inference/project10_prefix_caching/evaluate_mmlu.py --subjects=anatomy --limit=none
    uv run python phase4_advanced_inference/project10_prefix_caching/evaluate_mmlu.py --store=block --prefix_cache_mb=64

Every question of a subject starts with the same header and five solved dev questions. Project 4's harness
(batches of --batch_size rows, sorted by length) computes them for every question; with the prefix cache
(few_shot.py: the same scorer, one question per forward) the first question of a subject computes them and the
others reuse their K/V. Both pick an answer for every question; the picks must be identical (the scores agree
to ~1e-5: a different order of the same float operations). Writes <out>.json and <out>.md (project 4's report).
"""

from __future__ import annotations

import torch

from course.cli import ArgumentParser
from course.device import get_device, machine_summary, set_seed
from course.errors import CourseError, run_cli
from phase1_foundation.project3_pretrain.loading import load_model, load_tokenizer_for
from phase2_finetuning.project4_sft.harness import tasks
from phase2_finetuning.project4_sft.harness.multiple_choice import evaluate_multiple_choice
from phase2_finetuning.project4_sft.harness.report import write_report
from phase4_advanced_inference.project10_prefix_caching.block_hash import BlockHashCache
from phase4_advanced_inference.project10_prefix_caching.config import PrefixCacheConfig
from phase4_advanced_inference.project10_prefix_caching.few_shot import evaluate_multiple_choice_cached
from phase4_advanced_inference.project10_prefix_caching.radix_cache import RadixCache

GET_MODEL = "uv run python phase3_core_inference/project8_kv_cache/download_model.py --format gguf"


def make_store(cfg: PrefixCacheConfig, model):
    """The prefix cache the config asks for, sized for this model's K/V."""
    if cfg.store == "block":
        return BlockHashCache.for_model(model, cfg.prefix_cache_mb, block_size=cfg.block_size)
    return RadixCache.for_model(model, cfg.prefix_cache_mb)


def mmlu_items(cfg: PrefixCacheConfig) -> list[tasks.MCItem]:
    known = tasks.mmlu_subjects(cfg.data_dir)
    unknown = [s for s in cfg.subject_list if s not in known]
    if unknown:
        raise CourseError(f"unknown MMLU subject(s): {', '.join(unknown)}; choose from data/mmlu/test, e.g. "
                          f"{', '.join(known[:3])}")
    items = tasks.load_mmlu("test", cfg.shots, cfg.subject_list, cfg.data_dir)
    return tasks.subset(items, cfg.limit, cfg.seed, key=lambda it: it.subject)


def differences(a, b) -> int:
    """Questions on which two results picked different answers."""
    return sum(x != y for x, y in zip(a.extra["picks"], b.extra["picks"]))


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(description=__doc__)
    PrefixCacheConfig.add_args(parser, default_preset="cpu")
    cfg = PrefixCacheConfig.from_args(parser.parse_args(argv))
    cfg.print_config()
    set_seed(cfg.seed)
    items = mmlu_items(cfg)  # a missing data set or subject: one line, before the model loads
    device = get_device(cfg.device)
    try:
        loaded = load_model(cfg.model, device, getattr(torch, cfg.dtype))
    except CourseError as e:
        raise CourseError(f"{e} (SmolLM2: {GET_MODEL})") from None
    model, tok = loaded.model, load_tokenizer_for(loaded, cfg.tokenizer)
    without = evaluate_multiple_choice(model, tok, items, "mmlu (project 4)", batch_size=cfg.batch_size)
    store = make_store(cfg, model)
    with_cache = evaluate_multiple_choice_cached(model, tok, items, f"mmlu ({cfg.store} prefix cache)", store)
    diff = differences(without, with_cache)
    meta = {"model": cfg.model, "shots": cfg.shots, "subjects": cfg.subject_list, "limit": cfg.limit,
            "machine": machine_summary(), "picks_differ": diff, "config": cfg.to_dict()}
    js, md = write_report([without, with_cache], cfg.out, meta)
    print(f"report: {js} and {md}")
    print(f"prefix cache: {store.summary()}")
    print(f"summary: MMLU {cfg.shots}-shot, {len(items)} questions of {len(cfg.subject_list)} subject(s): accuracy "
          f"{100 * without.accuracy:.2f}% without the cache, {100 * with_cache.accuracy:.2f}% with it "
          f"({'picks identical' if diff == 0 else f'{diff} picks differ'}); project 4's harness "
          f"{without.seconds:.1f} s (batch {cfg.batch_size}), with the {cfg.store} prefix cache "
          f"{with_cache.seconds:.1f} s ({without.seconds / max(with_cache.seconds, 1e-9):.1f}x), hit rate "
          f"{100 * store.hit_rate:.1f}%")


if __name__ == "__main__":
    run_cli(main)
