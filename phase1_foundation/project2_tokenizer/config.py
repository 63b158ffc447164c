"""Hyperparameters of tokenizer training (train_tokenizer.py), with presets and validation.

Tokenizer training runs on the CPU whatever the machine (BPE is integer bookkeeping, not tensor
math), so the presets differ only in how many processes pre-tokenize. Both train the course
tokenizer: 10,000 ids including "<|endoftext|>", which project 3 and later projects rely on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from course.config import BaseConfig
from phase1_foundation.project2_tokenizer.patterns import SPLIT_PATTERNS
from phase1_foundation.project2_tokenizer.tokenizer import TRAINERS

MAX_WORKERS = 64  # pre-tokenization processes; more only costs memory


@dataclass
class TokenizerConfig(BaseConfig):
    vocab_size: int = 10_000              # total ids: 256 bytes + merges + special tokens
    pattern: str = "gpt4"                 # split pattern: gpt2 | gpt4 (cl100k)
    special_tokens: str = "<|endoftext|>"  # comma-separated; they get the last ids
    data_dir: str = "data/gutenberg"      # the *.txt.gz books (download_data.py --dataset gutenberg)
    heldout_every: int = 25               # book k is held out for evaluation when k % heldout_every == 0
    max_train_mb: float = 0.0             # use only the first N MB of training text (0 = all)
    num_workers: int = 2                  # pre-tokenization processes
    trainer: str = "fast"                 # fast: the heap trainer (fast_bpe.py, seconds); plain: bpe.py's loop
                                          # (the definition; hours on the full corpus, fine with max_train_mb=0.1)
    out_dir: str = "checkpoints/project2"
    plot_sizes: str = "256,512,1000,2000,5000,10000"  # vocab sizes for the compression-vs-vocab plot
    log_every: int = 1000                 # print a sample merge every N merges (0 = never)

    PRESETS: ClassVar[dict] = {
        "cpu": {"num_workers": 2},
        "gpu": {"num_workers": 8},  # a GPU machine has more cores; the tokenizer itself stays on CPU
    }

    def special_token_list(self) -> list[str]:
        return [s.strip() for s in self.special_tokens.split(",") if s.strip()]

    def plot_size_list(self) -> list[int]:
        """The sizes to plot: those of plot_sizes up to vocab_size, and vocab_size itself (the trained one)."""
        sizes = {int(s) for s in self.plot_sizes.split(",") if s.strip()}
        return sorted({s for s in sizes if s < self.vocab_size} | {self.vocab_size})

    def check(self) -> list[str]:
        errors = super().check()
        if errors:
            return errors
        specials = self.special_token_list()
        if len(set(specials)) != len(specials):
            errors.append(f"special_tokens ({self.special_tokens!r}) lists a token twice")
        if self.vocab_size <= 256 + len(specials):
            errors.append(f"vocab_size ({self.vocab_size}) must be > 256 + {len(specials)} special token(s) "
                          f"= {256 + len(specials)}, to leave room for at least one merge")
        self.check_choice(errors, "pattern", SPLIT_PATTERNS)
        self.check_choice(errors, "trainer", TRAINERS)
        self.check_positive(errors, "num_workers")
        if self.num_workers > MAX_WORKERS:
            errors.append(f"num_workers ({self.num_workers}) must be <= {MAX_WORKERS} (one process per CPU core is plenty)")
        if self.heldout_every < 0 or self.heldout_every == 1:
            errors.append(f"heldout_every ({self.heldout_every}) must be 0 (no held-out books) or >= 2")
        if self.max_train_mb < 0:
            errors.append(f"max_train_mb ({self.max_train_mb}) must be >= 0")
        if self.log_every < 0:
            errors.append(f"log_every ({self.log_every}) must be >= 0")
        try:
            if any(int(s) < 256 for s in self.plot_sizes.split(",") if s.strip()):
                errors.append(f"plot_sizes ({self.plot_sizes}) must all be >= 256 (the byte alphabet)")
        except ValueError:
            errors.append(f"plot_sizes ({self.plot_sizes!r}) must be comma-separated integers")
        return errors
