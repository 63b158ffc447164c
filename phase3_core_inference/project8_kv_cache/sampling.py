"""The sampling pipeline: repetition penalty -> temperature -> top-k -> top-p -> min-p -> sample/argmax.

PAPERS
- Keskar et al. 2019, "CTRL: A Conditional Transformer Language Model for Controllable Generation":
  the repetition penalty (divide positive logits of already-seen tokens by theta, multiply negative ones).
- Fan, Lewis, Dauphin 2018, "Hierarchical Neural Story Generation": top-k sampling.
- Holtzman et al. 2020, "The Curious Case of Neural Text Degeneration": nucleus (top-p) sampling.
- Nguyen et al. 2024, "Turning Up the Heat: Min-p Sampling for Creative and Coherent LLM Outputs":
  min-p, a cut-off relative to the most likely token's probability.

Temperature, top-k and top-p come from project 1 (imported, not copied); this module adds the
repetition penalty, min-p, and the pipeline in the order Hugging Face `generate()` applies them, so
the tests can check each step against the matching `transformers` logits processor.
Every filter is a small pure function on a (..., vocab) logits tensor that returns new logits with the
removed tokens at -inf.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from course.errors import ConfigError
from phase1_foundation.project1_minimal_gpt.sampling import apply_temperature, top_k_filter, top_p_filter

__all__ = ["apply_repetition_penalty", "apply_temperature", "top_k_filter", "top_p_filter", "min_p_filter",
           "SamplingParams", "process_logits", "sample_token"]


def apply_repetition_penalty(logits: torch.Tensor, prev_ids: torch.Tensor, penalty: float) -> torch.Tensor:
    """Make every token already in `prev_ids` (B, S) less likely.

    PAPER: Keskar et al. 2019 (CTRL), section 4.1.
    INTUITION: a logit l of a seen token becomes l / penalty if l > 0 and l * penalty if l < 0, i.e. it is
    always pushed down for penalty > 1 (dividing a negative logit would push it UP, hence the two cases).
    A token is penalised once however often it appeared (as in `transformers`).
    """
    if penalty == 1.0 or prev_ids is None or prev_ids.numel() == 0:
        return logits
    score = torch.gather(logits, -1, prev_ids)
    score = torch.where(score < 0, score * penalty, score / penalty)
    return logits.scatter(-1, prev_ids, score)


def min_p_filter(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """Keep tokens whose probability is at least min_p x the top token's probability.

    PAPER: Nguyen et al. 2024 (min-p sampling).
    INTUITION: a confident distribution (top token p=0.9) keeps few tokens, a flat one keeps many:
    the cut-off scales with the model's confidence, unlike top-p's fixed mass or top-k's fixed count.
    The top token always survives.
    """
    if min_p is None or min_p <= 0.0:
        return logits
    probs = torch.softmax(logits, dim=-1)
    threshold = min_p * probs.amax(dim=-1, keepdim=True)
    return logits.masked_fill(probs < threshold, float("-inf"))


@dataclass
class SamplingParams:
    """Decoding settings. temperature 0 = greedy (argmax); None / 0 / 1.0 switch a filter off."""

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repetition_penalty: float = 1.0

    def problems(self) -> list[str]:
        """One message per bad setting (GenerateConfig.check shows them beside its own)."""
        errors = []
        if self.temperature < 0:
            errors.append(f"temperature ({self.temperature}) must be >= 0 (0 = greedy)")
        if self.top_k is not None and self.top_k < 0:
            errors.append(f"top_k ({self.top_k}) must be >= 0 (0 = off)")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            errors.append(f"top_p ({self.top_p}) must be in (0, 1]")
        if self.min_p is not None and not 0.0 <= self.min_p <= 1.0:
            errors.append(f"min_p ({self.min_p}) must be in [0, 1]")
        if self.repetition_penalty <= 0:
            errors.append(f"repetition_penalty ({self.repetition_penalty}) must be > 0 (1.0 = off)")
        return errors

    def check(self) -> "SamplingParams":
        errors = self.problems()
        if errors:
            raise ConfigError("invalid sampling settings: " + "; ".join(errors))
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def process_logits(logits: torch.Tensor, params: SamplingParams, prev_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Apply the whole pipeline (in `transformers` order) to (B, vocab) logits; returns new logits."""
    logits = apply_repetition_penalty(logits, prev_ids, params.repetition_penalty)
    if params.greedy:
        return logits  # the filters below never change the argmax
    if params.temperature != 1.0:
        logits = apply_temperature(logits, params.temperature)
    if params.top_k:
        logits = top_k_filter(logits, min(params.top_k, logits.size(-1)))
    if params.top_p is not None and params.top_p < 1.0:
        logits = top_p_filter(logits, params.top_p)
    if params.min_p:
        logits = min_p_filter(logits, params.min_p)
    return logits


def sample_token(logits: torch.Tensor, params: SamplingParams, prev_ids: torch.Tensor | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token ids (B, 1) from (B, vocab) logits: argmax when greedy, else a draw from the softmax."""
    logits = process_logits(logits, params, prev_ids)
    if params.greedy:
        return logits.argmax(dim=-1, keepdim=True)
    probs = torch.softmax(logits.float(), dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator)
