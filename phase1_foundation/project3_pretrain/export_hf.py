"""Export a train.py checkpoint to the Hugging Face layout, and check transformers continues text as we do.

    uv run python phase1_foundation/project3_pretrain/export_hf.py --ckpt checkpoints/project3/cpu/ckpt.pt --out_dir checkpoints/project3/hf
    uv run python phase1_foundation/project3_pretrain/export_hf.py --no_check      # export only

The folder (config.json, model.safetensors, tokenizer.pkl) is what hf_interop.export_hf writes; the check loads
it with transformers' LlamaForCausalLM and compares the logits and a greedy continuation with ours.
"""

from __future__ import annotations

from pathlib import Path

import torch

from course.cli import ArgumentParser, existing_file, out_dir as out_dir_type, positive_int, utf8_text
from course.errors import CourseError, run_cli
from course.paths import repo_path
from phase1_foundation.project3_pretrain.generation import generate_ids
from phase1_foundation.project3_pretrain.hf_interop import export_hf
from phase1_foundation.project3_pretrain.loading import load_any, load_matching_tokenizer, tokenizer_path
from phase1_foundation.project3_pretrain.model import Llama


def main(argv: list[str] | None = None) -> None:
    p = ArgumentParser(description=__doc__)
    p.add_argument("--ckpt", default="checkpoints/project3/cpu/ckpt.pt", help="train.py checkpoint")
    p.add_argument("--out_dir", type=out_dir_type, default=Path("checkpoints/project3/hf"), help="folder to write")
    p.add_argument("--tokenizer", type=existing_file, default=None,
                   help="tokenizer .pkl to copy in (default: the training one)")
    p.add_argument("--prompt", type=utf8_text, default="It was a dark and stormy night",
                   help="prompt for the greedy check")
    p.add_argument("--max_new_tokens", type=positive_int, default=40, help="tokens of the greedy check")
    p.add_argument("--no_check", action="store_true", help="export only (no transformers needed)")
    p.add_argument("--seed", type=int, default=0, help="unused: export and greedy decoding are deterministic")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    model, stored_tok = load_any(args.ckpt, None, torch.device("cpu"))
    if not isinstance(model, Llama):
        raise CourseError(f"{args.ckpt} holds a {type(model).__name__}; only the LLaMA architecture exports to HF")
    tok_path = tokenizer_path(args.tokenizer, stored_tok)
    tok = load_matching_tokenizer(tok_path, model)
    out = export_hf(model, repo_path(args.out_dir), tok_path)
    print(f"exported {model.num_params():,} parameters to {out}/ (config.json, model.safetensors, tokenizer.pkl)")
    if args.no_check:
        return
    try:
        from transformers import LlamaForCausalLM
    except ImportError:
        raise CourseError("the check needs transformers (uv sync --group dev); or pass --no_check") from None
    ref = LlamaForCausalLM.from_pretrained(out).eval()
    idx = torch.tensor([tok.encode(args.prompt)], dtype=torch.long)
    with torch.no_grad():
        diff = (ref(idx).logits - model(idx)[0]).abs().max().item()
    theirs = ref.generate(idx, max_new_tokens=args.max_new_tokens, do_sample=False, pad_token_id=tok.eot_token,
                          eos_token_id=None)
    ours = generate_ids(model, idx, args.max_new_tokens, temperature=0.0)
    same = theirs.tolist() == ours.tolist()
    print(f"ours:         {tok.decode(ours[0].tolist())!r}")
    print(f"transformers: {tok.decode(theirs[0].tolist())!r}")
    print(f"done: max_logit_diff={diff:.2e} greedy_identical={same} new_tokens={args.max_new_tokens}")
    if not same:
        raise CourseError("transformers' greedy continuation differs from ours")


if __name__ == "__main__":
    run_cli(main)
