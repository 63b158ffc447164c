"""Pre-train the LLaMA-style model (or, with --arch gpt, project 1's GPT) on the tokenized corpus.

    uv run python phase1_foundation/project3_pretrain/train.py                          # cpu preset, 30 min
    uv run python phase1_foundation/project3_pretrain/train.py --arch gpt --out_dir checkpoints/project3/gpt
    uv run python phase1_foundation/project3_pretrain/train.py --preset gpu             # ~125M, bf16, compile
    uv run python phase1_foundation/project3_pretrain/train.py --resume                 # exact resume

PAPERS
    Loshchilov & Hutter, 2019, "Decoupled Weight Decay Regularization": AdamW, decay on matrices only.
    Goyal et al., 2017 (linear warmup); Loshchilov & Hutter, 2017 (cosine decay) - project 1's cosine_lr.
    Pascanu, Mikolov & Bengio, 2013: gradient-norm clipping.
    Micikevicius et al., 2018, "Mixed Precision Training": fp16 with loss scaling (GradScaler); bf16 needs none.
    Chen et al., 2016, "Training Deep Nets with Sublinear Memory Cost": gradient checkpointing.
    Chowdhery et al., 2022 (PaLM), appendix B: model FLOPs utilisation (flops.py).

Everything a run produces goes to --out_dir:
    ckpt.pt       model, optimizer, GradScaler, step, RNG states, batch-sampler state, configs (exact --resume)
    log.jsonl     one JSON object per log line / evaluation (train loss, lr, tokens/s, MFU, val loss, ppl, bpb)
    curves.png    train/val loss and val bits-per-byte curves;  tb/ TensorBoard events when tensorboard is installed
and the run ends with one line `done: ... val_bpb=... tokens_per_s=... mfu=...`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
from pathlib import Path

import torch
from tqdm import tqdm

from course.checkpoint import capture_rng_state, remove_stale_temps, restore_rng_state, save_checkpoint
from course.cli import ArgumentParser, warn_if_gpu_preset_without_gpu
from course.config import parse_configs
from course.device import device_summary, get_device, set_seed
from course.errors import ConfigError, CourseError, check_finite_loss, run_cli
from course.paths import repo_path
from phase1_foundation.project1_minimal_gpt.schedule import cosine_lr, estimate_loss
from phase1_foundation.project3_pretrain.config import LlamaConfig, TrainConfig
from phase1_foundation.project3_pretrain.data import TRAIN_CMD, TokenData
from phase1_foundation.project3_pretrain.flops import count_params, gpu_peak, measure_matmul_peak, model_flops_per_token
from phase1_foundation.project3_pretrain.loading import build_model, load_model_from_checkpoint
from phase1_foundation.project3_pretrain.run_log import plot_run

LN2 = math.log(2)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32  # CPU autocast to bf16 is slow on most CPUs without AMX
    return getattr(torch, name)


def peak_flops(tcfg: TrainConfig, device: torch.device, dtype: torch.dtype) -> tuple[float, str]:
    if tcfg.peak_flops is not None:
        return tcfg.peak_flops, "given"
    if device.type == "cuda":
        peak = gpu_peak(device, dtype)
        if peak:
            return peak, "datasheet"
    # A quick measurement (the best of 1024^3 and 2048^3 matmuls); benchmark.py --what peak is the careful one.
    return max(measure_matmul_peak(device, dtype, n=n, seconds=1.0) for n in (1024, 2048)), "measured"


# ---- the run ------------------------------------------------------------------------------------
def _state(model, optimizer, scaler, it, mcfg, tcfg, arch, losses, elapsed, tokens, batch_gen, seed, horizon, meta):
    return {"iter": it, "model_state_dict": model.state_dict(), "optimizer_state_dict": optimizer.state_dict(),
            "scaler_state_dict": scaler.state_dict(), "train_loss": losses.get("train"), "val_loss": losses.get("val"),
            "arch": arch, "model_config": mcfg.to_dict(), "train_config": tcfg.to_dict(), "seed": seed,
            "rng_state": capture_rng_state(), "batch_rng_state": batch_gen.get_state(), "elapsed_s": elapsed,
            "tokens_seen": tokens, "lr_horizon": horizon, "data_meta": meta}


def train(mcfg: LlamaConfig, tcfg: TrainConfig, *, device: str = "auto", seed: int = 1337, resume: bool = False,
          progress: bool = True, train_overrides: dict | None = None, model_overrides: dict | None = None,
          preset_given: bool = False) -> dict:
    """Train or resume; return the summary dict. Exact resume: a run of 2N steps equals N + --resume + N.

    A loss that becomes nan/inf stops the run before it is saved (NonFiniteLossError, one line); Ctrl-C or
    SIGTERM ends in one line with the --resume command (a save in flight completes first).
    """
    out_dir = repo_path(tcfg.out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"out_dir {out_dir} is an existing file, not a folder; pick another --out_dir")
    state = None
    if resume:
        if preset_given:
            raise ConfigError("--preset cannot be combined with --resume (the run continues with its checkpoint's "
                              "configs); drop --preset, or start a new run in another --out_dir")
        ckpt = out_dir / "ckpt.pt"
        if not ckpt.is_file():
            raise CourseError(f"checkpoint not found: {ckpt}; nothing to resume; start without --resume: {TRAIN_CMD}")
        _, state = load_model_from_checkpoint(ckpt)  # kind, config and every tensor's shape checked first
        if "train_config" not in state or "optimizer_state_dict" not in state:
            raise CourseError(f"{ckpt} holds no training state (train_config, optimizer); it cannot be resumed: "
                              f"start a new run in another --out_dir")
        mcfg = LlamaConfig.from_dict(state["model_config"])
        changed = [k for k, v in (model_overrides or {}).items() if v != getattr(mcfg, k)]
        if changed:
            raise ConfigError(f"cannot change {', '.join(sorted(changed))} when resuming (the checkpoint's network "
                              "has another shape); drop those flags or start a new run in another --out_dir")
        tcfg = TrainConfig.from_dict({**state["train_config"], **(train_overrides or {})}).validate_config()
        if tcfg.arch != state["arch"]:
            raise ConfigError(f"cannot resume a '{state['arch']}' checkpoint as --arch {tcfg.arch}")
        seed = state["seed"]
    if tcfg.threads is not None:
        torch.set_num_threads(tcfg.threads)
    dev = get_device(device)
    set_seed(seed)
    data = TokenData(repo_path(tcfg.data_dir), mcfg.block_size)
    if mcfg.vocab_size != data.vocab_size:
        if resume:
            raise CourseError(f"{data.dir}/meta.json has vocab_size {data.vocab_size} but the checkpoint's model has "
                              f"{mcfg.vocab_size}; the data was tokenized with another tokenizer")
        mcfg = dataclasses.replace(mcfg, vocab_size=data.vocab_size).validate_config()
    if tcfg.grad_checkpointing and tcfg.arch != "llama":
        raise ConfigError("grad_checkpointing is implemented for --arch llama only")

    model = build_model(tcfg.arch, mcfg).to(dev)
    if tcfg.grad_checkpointing:
        model.gradient_checkpointing = True
    dtype = resolve_dtype(tcfg.dtype, dev)
    if dtype == torch.bfloat16 and dev.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError("this GPU has no bfloat16 support; use --dtype float16 (with loss scaling) or auto")
    autocast = (torch.autocast(dev.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext())
    scaler = torch.amp.GradScaler(dev.type, enabled=(dtype == torch.float16))
    optimizer = model.configure_optimizer(tcfg.weight_decay, tcfg.learning_rate, (tcfg.beta1, tcfg.beta2), dev.type)

    batch_gen = torch.Generator().manual_seed(seed)  # the "data position": the random-window sampler's state
    it, elapsed_before, tokens = 0, 0.0, 0
    horizon = tcfg.lr_decay_iters or tcfg.max_iters
    if state is not None:
        model.load_state_dict(state["model_state_dict"])
        optimizer.load_state_dict(state["optimizer_state_dict"])
        scaler.load_state_dict(state["scaler_state_dict"])
        it, elapsed_before, tokens = state["iter"], state["elapsed_s"], state["tokens_seen"]
        horizon = state["lr_horizon"] if tcfg.lr_decay_iters is None else tcfg.lr_decay_iters
        restore_rng_state(state["rng_state"])
        batch_gen.set_state(state["batch_rng_state"])
    fwd = torch.compile(model) if tcfg.compile else model
    start_iter = it

    n_params = count_params(model)
    fpt = model_flops_per_token(tcfg.arch, model, mcfg)
    peak, peak_src = peak_flops(tcfg, dev, dtype)
    tokens_per_iter = tcfg.batch_size * tcfg.grad_accum * mcfg.block_size
    print(f"{tcfg.arch}: {n_params:,} parameters | {fpt / 1e6:.1f} MFLOP/token | device {device_summary(dev)} "
          f"| {str(dtype).removeprefix('torch.')} | peak {peak / 1e12:.2f} TFLOP/s ({peak_src}) | "
          f"train {len(data.splits['train']):,} tokens, val {len(data.splits['val']):,} | "
          f"{tokens_per_iter:,} tokens/iter" + (f" | resuming at iter {it}" if resume else ""))

    def batch(split: str, gen: torch.Generator):
        return data.get_batch(split, tcfg.batch_size, dev, gen)

    def evaluate() -> dict:
        eval_gen = torch.Generator().manual_seed(seed + 1)  # same windows at every evaluation and for every arch
        with autocast:
            losses = estimate_loss(fwd, lambda split: batch(split, eval_gen), tcfg.eval_iters)
        out = {"iter": it, "tokens": tokens, "elapsed_s": elapsed_before + time.perf_counter() - t_loop}
        for split in ("train", "val"):
            out[f"{split}_loss"] = losses[split]
            out[f"{split}_ppl"] = math.exp(losses[split])
            out[f"{split}_bpb"] = losses[split] / LN2 * data.tokens_per_byte(split)
        return out

    out_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out_dir)  # a save killed outright in an earlier run; nothing of this run is in flight yet
    log_path = out_dir / "log.jsonl"
    if not resume and log_path.exists():
        log_path.unlink()
    log = open(log_path, "a")
    writer = _tensorboard(out_dir / "tb")

    def record(rec: dict) -> None:
        log.write(json.dumps(rec) + "\n")
        log.flush()
        if writer is not None:
            for k, v in rec.items():
                if k != "iter" and isinstance(v, (int, float)):
                    writer.add_scalar(k, v, rec["iter"])

    budget = tcfg.time_budget_s  # None: no wall-clock limit
    last_eval: dict = {}
    step_time, steps_done, tokens_timed, loss_acc = 0.0, 0, 0, None
    t_loop = time.perf_counter()
    bar = tqdm(total=tcfg.max_iters, initial=it, desc=f"train {tcfg.arch}", unit="it", disable=not progress,
               dynamic_ncols=True, mininterval=1.0)
    model.train()
    try:
        while True:
            elapsed = elapsed_before + time.perf_counter() - t_loop
            out_of_time = budget is not None and elapsed >= budget
            finished = it >= tcfg.max_iters or out_of_time
            if (it % tcfg.eval_interval == 0 and it != start_iter) or finished or it == 0:
                last_eval = evaluate()
                record({"kind": "eval", **last_eval})
                for split in ("train", "val"):  # before saving: a diverged model never overwrites a good one
                    check_finite_loss(last_eval[f"{split}_loss"], it, _last_good(out_dir, tcfg))
                bar.write(f"iter {it}: train loss {last_eval['train_loss']:.4f}, val loss {last_eval['val_loss']:.4f}, "
                          f"val ppl {last_eval['val_ppl']:.1f}, val bpb {last_eval['val_bpb']:.4f}")
                losses = {"train": last_eval["train_loss"], "val": last_eval["val_loss"]}
                save_checkpoint(out_dir / "ckpt.pt", _state(model, optimizer, scaler, it, mcfg, tcfg, tcfg.arch, losses,
                                                            last_eval["elapsed_s"], tokens, batch_gen, seed, horizon,
                                                            data.meta))
            if finished:
                break

            # With a wall-clock budget the cosine must end when time runs out: re-estimate the horizon from
            # the iterations/second of this run so far (evaluations included), as project 1 does.
            if budget is not None and steps_done >= 10 and tcfg.lr_decay_iters is None:
                rate = steps_done / (time.perf_counter() - t_loop)
                horizon = min(tcfg.max_iters, it + int(rate * (budget - elapsed)))
                bar.total = horizon  # the bar counts to the estimated end of the budget, not to max_iters
            lr = cosine_lr(it, tcfg.warmup_iters, horizon, tcfg.learning_rate, tcfg.min_lr)
            for group in optimizer.param_groups:
                group["lr"] = lr

            t0 = time.perf_counter()
            for micro in range(tcfg.grad_accum):
                x, y = batch("train", batch_gen)
                with autocast:
                    _, loss = fwd(x, y)
                # mean over micro-batches: the gradient equals that of one batch grad_accum times larger
                scaler.scale(loss / tcfg.grad_accum).backward()
                loss_acc = loss.detach() if micro == 0 else loss_acc + loss.detach()
            if tcfg.grad_clip > 0:
                scaler.unscale_(optimizer)  # clip the true gradients, not the loss-scaled ones
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), tcfg.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            it += 1
            steps_done += 1
            tokens += tokens_per_iter
            if it % tcfg.log_interval == 0:  # .item() waits for the device: only this often
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                step_time += time.perf_counter() - t0
                tokens_timed += tokens_per_iter
                tok_s = tokens_timed / step_time
                loss_value = check_finite_loss(loss_acc.item() / tcfg.grad_accum, it, _last_good(out_dir, tcfg))
                rec = {"kind": "train", "iter": it, "loss": loss_value, "lr": lr,
                       "tokens": tokens, "elapsed_s": elapsed_before + time.perf_counter() - t_loop,
                       "tokens_per_s": tok_s, "mfu": fpt * tok_s / peak}
                if tcfg.grad_clip > 0:
                    rec["grad_norm"] = float(grad_norm)
                record(rec)
                bar.set_postfix(loss=f"{rec['loss']:.3f}", lr=f"{lr:.1e}", tok_s=f"{tok_s:,.0f}",
                                mfu=f"{100 * rec['mfu']:.1f}%", refresh=False)
            else:
                step_time += time.perf_counter() - t0
                tokens_timed += tokens_per_iter
            bar.update(1)
    except CourseError:  # e.g. the loss became nan: the bar must not share the error's line
        bar.close()
        log.close()
        raise
    except KeyboardInterrupt:
        bar.close()
        log.close()
        saved = out_dir / "ckpt.pt"
        where = (f"the last complete checkpoint is {saved}; continue with: {TRAIN_CMD} --resume --out_dir {out_dir}"
                 if saved.is_file() else f"nothing was saved yet; start again with: {TRAIN_CMD}")
        raise CourseError(f"training interrupted at iter {it}; {where}") from None
    bar.close()
    log.close()
    if writer is not None:
        writer.close()

    tok_s = tokens_timed / step_time if step_time > 0 else 0.0
    summary = {"arch": tcfg.arch, "params": n_params, "iters": it, "tokens_seen": tokens, **last_eval,
               "tokens_per_s": tok_s, "mfu": fpt * tok_s / peak, "flops_per_token": fpt, "peak_flops": peak,
               "peak_source": peak_src, "device": device_summary(dev), "dtype": str(dtype).removeprefix("torch."),
               "stopped_by": "time_budget" if out_of_time else "max_iters"}
    if dev.type == "cuda":
        summary["max_memory_gb"] = torch.cuda.max_memory_allocated(dev) / 2**30
    plot_run(out_dir)
    print(f"saved: {out_dir / 'ckpt.pt'}, {log_path}, {out_dir / 'curves.png'}")
    print(f"done: arch={tcfg.arch} params={n_params:,} iters={it} tokens={tokens:,} "
          f"val_loss={summary.get('val_loss', float('nan')):.4f} val_ppl={summary.get('val_ppl', float('nan')):.1f} "
          f"val_bpb={summary.get('val_bpb', float('nan')):.4f} tokens_per_s={tok_s:,.0f} "
          f"mfu={100 * summary['mfu']:.1f}%")
    return summary


def _last_good(out_dir: Path, tcfg: TrainConfig) -> str:
    ckpt = out_dir / "ckpt.pt"
    return (f"the last good checkpoint is {ckpt} (continue it with --resume and a lower --learning_rate, "
            f"now {tcfg.learning_rate:g})" if ckpt.is_file() else "nothing was saved")


def _tensorboard(path: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional: the JSONL log and the PNG carry the same numbers
        return None
    return SummaryWriter(str(path))


def build_parser() -> ArgumentParser:
    """The script's own flags; main() adds LlamaConfig's and TrainConfig's (one --preset, one flag per field)."""
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda or mps")
    parser.add_argument("--seed", type=int, default=1337, help="random seed (default: %(default)s)")
    parser.add_argument("--resume", action="store_true",
                        help="continue from OUT_DIR/ckpt.pt (its configs; training flags given here override)")
    parser.add_argument("--no_progress", action="store_true", help="no tqdm bar (for logs)")
    return parser


def main(argv: list[str] | None = None) -> dict:
    args, mcfg, tcfg = parse_configs(build_parser(), LlamaConfig, TrainConfig, argv=argv, default_preset="cpu")
    train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    model_fields = {f.name for f in dataclasses.fields(LlamaConfig)}
    train_over = {k: v for k, v in args.overrides.items() if k in train_fields}
    model_over = {k: v for k, v in args.overrides.items() if k in model_fields}
    if not args.resume:
        warn_if_gpu_preset_without_gpu(args.preset, args.device)
        mcfg.print_config(f"LlamaConfig (preset {args.preset})")
        tcfg.print_config(f"TrainConfig (preset {args.preset})")
    return train(mcfg, tcfg, device=args.device, seed=args.seed, resume=args.resume,
                 progress=not args.no_progress, train_overrides=train_over, model_overrides=model_over,
                 preset_given=args.preset_given)


if __name__ == "__main__":
    run_cli(main)
