"""Talk to a fine-tuned model: a multi-turn chat with its own template, answered by the plain sampling loop.

    uv run python phase2_finetuning/project4_sft/chat.py                                  # checkpoints/project4/cpu
    uv run python phase2_finetuning/project4_sft/chat.py --model checkpoints/project4/smollm2-identity
    uv run python phase2_finetuning/project4_sft/chat.py --model data/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
    echo "Who are you?" | uv run python phase2_finetuning/project4_sft/chat.py --temperature 0

--model: train_sft.py's OUT_DIR (or its ckpt.pt), or any base model project 3's loader takes (a base model
of ours gets the chat tokens added, untrained: it will ramble, which is what SFT fixes). Every turn is
rendered with the model's chat template and the model answers until it writes its end-of-turn token
(or --max_new_tokens runs out: then "[no end of turn]" is shown). The session follows course.interactive:
/reset starts a new conversation, /quit or Ctrl-D quits, Ctrl-C stops an answer.
No KV cache: every token recomputes the whole window (project 8 makes this fast).
"""

from __future__ import annotations

import sys

import torch

from course.cli import ArgumentParser, nonneg_float, nonneg_int, positive_int, utf8_text
from course.device import get_device, set_seed
from course.errors import CourseError, run_cli
from course.interactive import run_session
from phase2_finetuning.project4_sft.masking import encode_prompt
from phase2_finetuning.project4_sft.reply import sample_reply
from phase2_finetuning.project4_sft.sft import load_chat_model


class Conversation:
    """The messages so far; `answer` adds the user's line and the model's reply (streamed to `out`)."""

    def __init__(self, cm, max_new_tokens: int, temperature: float, top_k: int, system: str = "",
                 generator: torch.Generator | None = None):
        self.cm, self.max_new, self.temperature, self.top_k = cm, max_new_tokens, temperature, top_k
        self.system, self.generator = system, generator
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def answer(self, line: str, out) -> None:
        cm = self.cm
        messages = self.messages + [{"role": "user", "content": line.strip()}]
        ids = encode_prompt(cm.tok, cm.fmt.template, messages, bos_token=cm.fmt.bos_token,
                            eos_token=cm.fmt.end_token)
        if len(ids) >= cm.model.config.block_size:
            raise CourseError(f"the conversation is {len(ids)} tokens, the model's context is "
                              f"{cm.model.config.block_size}; /reset to start a new one")
        reply = sample_reply(cm.model, ids, cm.fmt.end_ids(cm.tok), self.max_new, cm.tok.decode,
                             temperature=self.temperature, top_k=self.top_k, generator=self.generator,
                             on_token=lambda text: (out.write(text), out.flush()))
        if not reply.ended:
            out.write(" [no end of turn]")
        # the turn is kept as the model wrote it, so the next prompt holds what the model actually said
        self.messages = messages + [{"role": "assistant", "content": reply.text.strip()}]


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="checkpoints/project4/cpu", type=utf8_text,
                        help="train_sft.py's OUT_DIR or ckpt.pt, or a base model spec (default: %(default)s)")
    parser.add_argument("--tokenizer", default="", type=utf8_text, help="override the tokenizer (base models)")
    parser.add_argument("--system", default="", type=utf8_text, help="a system message for every conversation")
    parser.add_argument("--max_new_tokens", type=positive_int, default=200)
    parser.add_argument("--temperature", type=nonneg_float, default=0.7, help="0 = greedy (default: %(default)s)")
    parser.add_argument("--top_k", type=nonneg_int, default=50, help="0 = no top-k cut (default: %(default)s)")
    parser.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda or mps")
    parser.add_argument("--seed", type=int, default=1337)
    args = parser.parse_args(argv)
    set_seed(args.seed)
    device = get_device(args.device)
    cm = load_chat_model(args.model, device, args.tokenizer)
    gen = torch.Generator().manual_seed(args.seed)
    conv = Conversation(cm, args.max_new_tokens, args.temperature, args.top_k, args.system, gen)
    banner = (f"chatting with {args.model} ({cm.note}); /reset for a new conversation, /quit to quit"
              if sys.stdin.isatty() else None)
    run_session(conv.answer, prompt="you> " if sys.stdin.isatty() else "", banner=banner, reset=conv.reset)


if __name__ == "__main__":
    run_cli(main)
