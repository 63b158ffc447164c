"""Preference tuning: DPO (and IPO, hinge, SimPO) on preference pairs, against a frozen reference model.

    uv run python phase2_finetuning/project6_dpo/train_dpo.py                       # cpu preset: SmolLM2, rasbt pairs
    uv run python phase2_finetuning/project6_dpo/train_dpo.py --resume              # exact resume from OUT_DIR
    uv run python phase2_finetuning/project6_dpo/train_dpo.py --loss_type ipo --out_dir checkpoints/project6/ipo
    uv run python phase2_finetuning/project6_dpo/train_dpo.py --loss_type simpo --out_dir checkpoints/project6/simpo

PAPERS
    Rafailov et al., 2023 (DPO): the RLHF objective's optimum in closed form, trained as a classifier on pairs.
    Azar et al., 2023 (IPO): a squared loss towards a finite gap.  Mitchell, 2023 (cDPO): label smoothing for
    noisy labels.  Meng et al., 2024 (SimPO): a length-normalised, reference-free reward with a margin.
    Ouyang et al., 2022 (InstructGPT): the RLHF pipeline DPO shortens.

The policy starts as the base (an SFT model: SmolLM2-135M-Instruct, or a project 4 out_dir) and the reference is
a frozen copy of it (or --ref); simpo has no reference. The training machinery is project 4's (AdamW from
`configure_optimizer`, project 1's warmup + cosine `cosine_lr`, gradient clipping and accumulation, the
resumable RowSampler, atomic checkpoints through `course.checkpoint`); what is new is the batch (pairs, two rows
each) and the loss (dpo.py).

Before and after training the run measures, on each dataset's held-out pairs (never trained on):
    reward accuracy    the share of pairs whose implicit reward ranks chosen above rejected (a tie counts one
                       half: the untrained policy, whose rewards are all 0, scores exactly 50%)
    margin             the mean reward gap, chosen minus rejected
    reply length       the mean length in tokens of greedy answers to --gen_samples held-out prompts
                       (DPO is known to lengthen answers), and the share that end their turn within --gen_budget
The reference's held-out log-probs are computed once and kept in the checkpoint.
OUT_DIR gets ckpt.pt (a project 3 checkpoint: project 4's evaluate.py and chat.py read it), tokenizer.pkl,
tokenizer_config.json, log.jsonl, loss.png, accuracy.png, rewards.png, margins.png, results.json.
"""

from __future__ import annotations

import copy
import json
import math
import time

import torch
from tqdm import tqdm

from course.checkpoint import (
    atomic_write_json,
    capture_rng_state,
    load_checkpoint,
    remove_stale_temps,
    restore_rng_state,
    save_checkpoint,
)
from course.device import get_device, set_seed
from course.errors import ConfigError, check_finite_loss, run_cli
from course.paths import repo_path
from course.plots import plot_curves
from phase1_foundation.project1_minimal_gpt.schedule import cosine_lr
from phase2_finetuning.project4_sft.loop import parse_finetune_args, precision
from phase2_finetuning.project4_sft.reply import chat_reply
from phase2_finetuning.project4_sft.sft import (
    RowSampler,
    checkpoint_meta,
    load_chat_model,
    pad_id,
    save_chat_format_for,
)
from phase2_finetuning.project5_lora.lora import (
    count_trainable,
    inject_lora,
    merge_and_unload,
    save_adapter,
)
from phase2_finetuning.project6_dpo.config import DPOConfig
from phase2_finetuning.project6_dpo.dpo import (
    AdapterReference,
    FrozenReference,
    check_same_vocab,
    encode_pairs,
    heldout_logps,
    heldout_stats,
    pair_batch,
    reward_stats,
)
from phase2_finetuning.project6_dpo.preferences import load_preference_data

TRAIN_CMD = "uv run python phase2_finetuning/project6_dpo/train_dpo.py"
# What a run is made of: a --resume continues that run, it cannot swap these
FIXED_ON_RESUME = ("base", "ref", "tokenizer", "data", "max_pairs", "heldout", "block_size", "loss_type", "lora", "r",
                   "lora_alpha", "lora_dropout", "target_modules", "use_rslora")


def lora_state(model) -> dict:
    """The adapter matrices only (the base is frozen and comes back from --base on a resume)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items() if ".lora_" in k}


def merged_state(model) -> dict:
    """A plain model's weights: the adapters merged into a copy (the policy itself keeps training unmerged,
    so a resume is exact), under the names every loader of the course reads."""
    plain = copy.deepcopy(model)
    merge_and_unload(plain)
    return plain.state_dict()


def loss_kwargs(cfg: DPOConfig) -> dict:
    return {"loss_type": cfg.loss_type, "beta": cfg.beta_value, "label_smoothing": cfg.label_smoothing,
            "simpo_gamma": cfg.simpo_gamma}


def reply_lengths(cm, chats: list, budget: int) -> dict:
    """Greedy answers to held-out prompts: mean length in tokens, share that end their turn, the first one."""
    if not chats:
        return {}
    replies = [chat_reply(cm.model, cm.tok, cm.fmt, chat, budget) for chat in chats]
    return {"reply_tokens": sum(len(r.ids) for r in replies) / len(replies),
            "ended": sum(r.ended for r in replies) / len(replies), "example": replies[0].text[:200]}


def describe(m: dict) -> str:
    parts = [f"{name} held-out accuracy {100 * s['accuracy']:.1f}% margin {s['margin']:+.3f}"
             for name, s in m["heldout"].items() if s]
    if m.get("reply_tokens") is not None:
        parts.append(f"reply length {m['reply_tokens']:.1f} tokens ({100 * m['ended']:.0f}% ended)")
    return "; ".join(parts) or "no held-out pairs"


def train(cfg: DPOConfig, *, seed: int = 1337, resume: bool = False, overrides: dict | None = None,
          progress: bool = True, stop_at: int | None = None) -> dict:
    """Preference-tune (or resume) and return the summary. `stop_at` pauses after that step with a checkpoint,
    as a Ctrl-C at a step boundary would (the resume test: N steps + --resume equals one uninterrupted run)."""
    out_dir = repo_path(cfg.out_dir)
    state = None
    if resume:
        state = load_checkpoint(out_dir / "ckpt.pt", map_location="cpu",
                                hint=f"nothing to resume in {out_dir}; start without --resume: {TRAIN_CMD}")
        if "dpo_config" not in state:
            raise ConfigError(f"{out_dir}/ckpt.pt was not written by train_dpo.py; nothing to resume")
        fixed = sorted(set(overrides or {}) & set(FIXED_ON_RESUME))
        if fixed:
            raise ConfigError(f"--resume continues the saved run; --{fixed[0]} cannot change (start a new run in "
                              "another --out_dir instead)")
        cfg = DPOConfig.from_dict({**state["dpo_config"], **(overrides or {})}).validate_config()
        seed = state["seed"]
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    dev = get_device(cfg.device)
    set_seed(seed)
    remove_stale_temps(out_dir)

    # ---- the policy and its reference ----
    if cfg.lora:
        # the base again (its weights are frozen), the adapters from the checkpoint when resuming
        cm = load_chat_model(cfg.base, dev, cfg.tokenizer)
        wrapped = inject_lora(cm.model, cfg.target_modules, cfg.r, cfg.lora_alpha, cfg.lora_dropout, cfg.use_rslora)
        if state is not None:
            missing = set(lora_state(cm.model)) - set(state.get("lora_state_dict") or {})
            if missing:
                raise ConfigError(f"{out_dir}/ckpt.pt holds no adapter weights for {min(missing)}; it was "
                                  "not written by a --lora run")
            cm.model.load_state_dict(state["lora_state_dict"], strict=False)
        trainable, total = count_trainable(cm.model)
        note = f"LoRA r={cfg.r} on {len(wrapped)} layers: {trainable:,} trainable of {total:,} parameters"
    else:
        cm = load_chat_model(str(out_dir) if resume else cfg.base, dev, cfg.tokenizer)
        note = cm.note
    model = cm.model
    print(f"policy {cfg.base}: {model.num_params():,} parameters; {note}")
    reference = None
    if not cfg.reference_free:
        if cfg.ref is not None or (resume and not cfg.lora):
            ref_model = load_chat_model(cfg.ref or cfg.base, dev, cfg.tokenizer).model
            check_same_vocab(model, ref_model)
            reference = FrozenReference(ref_model)
            del ref_model
            how = "frozen"
        elif cfg.lora:
            reference, how = AdapterReference(model), "the policy with its adapters disabled (no copy)"
        else:
            reference, how = FrozenReference(model), "frozen copy"  # of the starting weights
        print(f"reference: {cfg.ref or cfg.base}, {how} ({cfg.loss_type}, beta {cfg.beta_value:g})")
    else:
        print(f"reference: none ({cfg.loss_type} is reference-free; beta {cfg.beta_value:g}, "
              f"gamma {cfg.simpo_gamma:g})")
    block = cfg.block_size or model.config.block_size
    if block > model.config.block_size:
        raise ConfigError(f"block_size ({block}) must be <= the model's context ({model.config.block_size})")

    # ---- the pairs ----
    data = load_preference_data(cfg.dataset_paths, cfg.heldout, seed, cfg.max_pairs)
    for line in data.lines:
        print(line)
    rows, stats = encode_pairs(cm.tok, cm.fmt, data.train, block)
    held_rows = {}
    for name, pairs in data.heldout.items():
        held_rows[name], hs = encode_pairs(cm.tok, cm.fmt, pairs, block)
        if hs.skipped:
            print(f"{name} held-out: {hs.summary()}")
    print(f"training pairs: {stats.summary()}")
    pad = pad_id(cm)
    sampler = RowSampler(len(rows), seed)
    gen_chats = [p.prompt for pairs in data.heldout.values() for p in pairs][:cfg.gen_samples]
    kw = loss_kwargs(cfg)

    autocast, scaler = precision(dev, cfg.dtype)
    optimizer = model.configure_optimizer(cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2), dev.type)

    def policy_heldout() -> dict:
        with autocast:
            return {name: heldout_logps(model, r, pad, cfg.batch_size, dev) for name, r in held_rows.items()}

    def heldout_numbers(policy_lp: dict, ref_lp: dict | None) -> dict:
        return {name: heldout_stats(policy_lp[name], None if ref_lp is None else ref_lp[name], **kw)
                for name in held_rows}

    def measure(policy_lp: dict, ref_lp: dict | None) -> dict:
        out = {"heldout": heldout_numbers(policy_lp, ref_lp)}
        if gen_chats:
            with autocast:
                out.update(reply_lengths(cm, gen_chats, cfg.gen_budget))
        return out

    it, before, ref_held = 0, None, None
    last_lp: tuple[int, dict | None] = (-1, None)  # (step, the policy's held-out log-probs at that step)
    if state is not None:
        optimizer.load_state_dict(state["optimizer_state_dict"])
        scaler.load_state_dict(state["scaler_state_dict"])
        sampler.load_state_dict(state["sampler"])
        restore_rng_state(state["rng_state"])
        it, before, ref_held = state["iter"], state["before"], state["ref_heldout"]
    else:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_chat_format_for(out_dir, cm)
        if reference is not None:
            with autocast, reference.context():
                ref_held = {name: heldout_logps(reference.model, r, pad, cfg.batch_size, dev)
                            for name, r in held_rows.items()}
        # the policy starts as the reference unless --ref names another model: then its numbers are the same
        before = measure(ref_held if reference is not None and cfg.ref is None else policy_heldout(), ref_held)
        print(f"before: {describe(before)}")

    log_path = out_dir / "log.jsonl"
    if not resume and log_path.exists():
        log_path.unlink()

    def record(rec: dict) -> None:
        with open(log_path, "a") as f:
            f.write(json.dumps(rec) + "\n")

    if not resume:  # the held-out numbers at step 0 start the curves
        record({"kind": "eval", "iter": 0, **{name: s for name, s in before["heldout"].items() if s}})

    def save(losses: dict, snapshot: tuple | None = None) -> None:
        """A checkpoint at a step boundary; `snapshot` = (sampler, RNG) states taken when the step began."""
        sampler_state, rng_state = snapshot or (sampler.state_dict(), capture_rng_state())
        if cfg.lora:
            save_adapter(model, out_dir / "adapter", base_model_name_or_path=cfg.base)
        save_checkpoint(out_dir / "ckpt.pt", {
            "iter": it, "model_state_dict": merged_state(model) if cfg.lora else model.state_dict(),
            "lora_state_dict": lora_state(model) if cfg.lora else None,
            "optimizer_state_dict": optimizer.state_dict(),
            "scaler_state_dict": scaler.state_dict(), "train_loss": losses.get("train"),
            "val_loss": losses.get("heldout"), "arch": "llama", "model_config": model.config.to_dict(),
            "data_meta": checkpoint_meta(out_dir), "dpo_config": cfg.to_dict(), "seed": seed,
            "rng_state": rng_state, "sampler": sampler_state, "before": before, "ref_heldout": ref_held,
            "base": cfg.base})

    bar = tqdm(total=cfg.max_iters, initial=it, desc=cfg.loss_type, unit="it", disable=not progress,
               dynamic_ncols=True, mininterval=1.0)
    model.train()
    last_train, t0, it0, snapshot = float("nan"), time.perf_counter(), it, None
    try:
        while it < cfg.max_iters:
            # Ctrl-C inside a step saves the state from before it: the resumed run redoes the whole step
            snapshot = (sampler.state_dict(), capture_rng_state())
            lr = cosine_lr(it, cfg.warmup_iters, cfg.max_iters, cfg.learning_rate, cfg.min_lr)
            for group in optimizer.param_groups:
                group["lr"] = lr
            acc, chosen, rejected = 0.0, [], []
            for _ in range(cfg.grad_accum):
                batch = [rows[i] for i in sampler.take(cfg.batch_size)]
                with autocast:
                    loss, out = pair_batch(model, reference, batch, pad, dev, **kw)
                scaler.scale(loss / cfg.grad_accum).backward()
                acc += loss.detach().float().item() / cfg.grad_accum
                chosen.append(out.chosen_rewards)
                rejected.append(out.rejected_rewards)
            check_finite_loss(acc, it, hint=f"lower --learning_rate (now {cfg.learning_rate:g})")
            if cfg.grad_clip > 0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            it += 1
            last_train = acc
            rs = reward_stats(torch.cat(chosen), torch.cat(rejected))
            record({"kind": "train", "iter": it, "loss": acc, "lr": lr, **rs,
                    "pairs_per_s": (it - it0) * cfg.batch_size * cfg.grad_accum / (time.perf_counter() - t0)})
            if it % cfg.log_interval == 0:
                bar.set_postfix(loss=f"{acc:.3f}", acc=f"{rs['accuracy']:.2f}", margin=f"{rs['margin']:+.2f}",
                                refresh=False)
            if it % cfg.eval_interval == 0 or it == cfg.max_iters:
                last_lp = (it, policy_heldout())  # the last step's is also the "after" below: computed once
                held = heldout_numbers(last_lp[1], ref_held)
                record({"kind": "eval", "iter": it, **{name: s for name, s in held.items() if s}})
                bar.write(f"iter {it}: train loss {acc:.4f}; " + "; ".join(
                    f"{name} held-out loss {s['loss']:.4f} accuracy {100 * s['accuracy']:.1f}%"
                    for name, s in held.items() if s))
                first = next((s for s in held.values() if s), {})
                save({"train": acc, "heldout": first.get("loss")})
            bar.update(1)
            if stop_at is not None and it >= stop_at and it < cfg.max_iters:
                bar.close()
                save({"train": acc})
                return {"iters": it, "paused": True}
    except KeyboardInterrupt:
        bar.close()
        optimizer.zero_grad(set_to_none=True)
        save({"train": last_train}, snapshot)
        print(f"\nsaved iter {it} to {out_dir / 'ckpt.pt'}; continue with: {TRAIN_CMD} --resume "
              f"--out_dir {cfg.out_dir}")
        raise
    bar.close()
    if state is not None and it == state["iter"]:
        save({"train": state.get("train_loss"), "heldout": state.get("val_loss")})

    after = measure(last_lp[1] if last_lp[0] == it else policy_heldout(), ref_held)
    plot_run(out_dir, cfg.log_interval)
    summary = {"base": cfg.base, "loss_type": cfg.loss_type, "beta": cfg.beta_value, "iters": it,
               "train_pairs": stats.rows, "skipped": dict(stats.skipped), "before": before, "after": after}
    atomic_write_json(out_dir / "results.json", summary)
    print(f"after: {describe(after)}")
    if after.get("example"):
        print(f"  e.g. {after['example']!r}")
    print(f"saved: {out_dir / 'ckpt.pt'}, tokenizer_config.json, loss.png, accuracy.png, rewards.png, "
          "margins.png, results.json")
    line = " ".join(f"{name}_accuracy {100 * before['heldout'][name]['accuracy']:.1f}% -> "
                    f"{100 * s['accuracy']:.1f}%" for name, s in after["heldout"].items() if s)
    if after.get("reply_tokens") is not None:
        line += f" reply_tokens {before['reply_tokens']:.1f} -> {after['reply_tokens']:.1f}"
    print(f"done: iters={it} {cfg.loss_type} {line}")
    return summary


def _smooth(ys: list[float], k: int) -> list[float]:
    """Running mean over the last k steps: one batch's reward accuracy is a handful of 0s and 1s."""
    out, total = [], 0.0
    for i, y in enumerate(ys):
        total += y - (ys[i - k] if i >= k else 0.0)
        out.append(total / min(i + 1, k))
    return out


def plot_run(out_dir, window: int = 5) -> None:
    recs = [json.loads(line) for line in (out_dir / "log.jsonl").read_text().splitlines() if line.strip()]
    train = [r for r in recs if r["kind"] == "train" and math.isfinite(r["loss"])]
    evals = [r for r in recs if r["kind"] == "eval"]
    names = sorted({k for r in evals for k in r if k not in ("kind", "iter")})
    xs = [r["iter"] for r in train]

    def held(key: str) -> dict:
        return {f"held-out {n}": ([r["iter"] for r in evals if n in r], [r[n][key] for r in evals if n in r])
                for n in names}

    def curves(key: str, label: str) -> dict:
        out = {f"train ({label}, mean of {window} steps)": (xs, _smooth([r[key] for r in train], window))} \
            if train else {}
        return {**out, **{k: v for k, v in held(key).items() if v[0]}}

    if train or evals:
        plot_curves(out_dir / "loss.png", curves("loss", "pairs"), title="preference loss", ylabel="loss")
        plot_curves(out_dir / "accuracy.png", curves("accuracy", "batch"), title="reward accuracy "
                    "(chosen reward > rejected)", ylabel="accuracy")
        plot_curves(out_dir / "margins.png", curves("margin", "batch"), title="reward margin (chosen - rejected)",
                    ylabel="margin")
        rewards = {f"{side} (train, mean of {window} steps)": (xs, _smooth([r[side] for r in train], window))
                   for side in ("chosen", "rejected")} if train else {}
        for n in names:
            for side in ("chosen", "rejected"):
                pts = [(r["iter"], r[n][side]) for r in evals if n in r]
                rewards[f"{side} (held-out {n})"] = ([x for x, _ in pts], [y for _, y in pts])
        plot_curves(out_dir / "rewards.png", rewards, title="implicit rewards", ylabel="reward")


def main(argv: list[str] | None = None) -> dict:
    args, cfg = parse_finetune_args(__doc__, DPOConfig, argv)
    return train(cfg, seed=args.seed, resume=args.resume, overrides=args.overrides, progress=not args.no_progress)


if __name__ == "__main__":
    run_cli(main)
