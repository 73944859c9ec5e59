"""What a batch call returns (generate, generate_leftright and the baselines):
APDOutput, the per-step callback's type, and the helpers that build the output
from the rows a loop finished with."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, List, Optional, Sequence

import torch

from apd_ext.decoding.stats import GenerationStats


# callback(step, tokens_accepted): step is the 1-based step just finished,
# tokens_accepted[b] the list of token ids sequence b committed in that step.
Callback = Callable[[int, List[List[int]]], None]


@dataclass
class APDOutput:
    """sequences: [B, max_b P_b + max_new] int64, row b = prompt b (from column
    0) + its generation, padded with the pad id after the sequence's end; num_generated: [B] int64 (the first EOS
    included); accepted_per_step[b]: tokens committed at each step."""

    sequences: torch.Tensor  # [B, P + max_new_tokens] int64
    num_generated: torch.Tensor  # [B] int64
    accepted_per_step: List[List[int]]
    stats: GenerationStats = field(default_factory=GenerationStats)
    prompt_lengths: List[int] = field(default_factory=list)

    def generated(self, b: int = 0) -> torch.Tensor:
        """The generated ids of sequence b (1-D, EOS included)."""
        start = self.prompt_lengths[b]
        return self.sequences[b, start : start + int(self.num_generated[b])]

    def sequence_stats(self, b: int) -> dict:
        """Per-sequence counters: steps it was live, tokens generated, tokens per step."""
        steps = len(self.accepted_per_step[b])
        gen = int(self.num_generated[b])
        return dict(steps=steps, generated_tokens=gen, tokens_per_step=gen / steps if steps else 0.0)


def first_eos_count(ids: Iterable[int], eos: Sequence[int]) -> int:
    """Number of ids up to and including the first EOS (all of them if none)."""
    ids = list(ids)
    for i, v in enumerate(ids):
        if v in eos:
            return i + 1
    return len(ids)


def finish_output(prompts: List[torch.Tensor], tokens: torch.Tensor, generated: Sequence[int],
                  max_new_tokens: int, pad_id: Optional[int], accepted: List[List[int]],
                  stats: GenerationStats) -> APDOutput:
    """tokens: [B, >= P_b + generated_b] rows in batch order (prompt b from
    column 0); keeps prompt + generated of each row, pads the rest."""
    B = len(prompts)
    plens = [p.numel() for p in prompts]
    pad = pad_id if pad_id is not None else 0
    seq = torch.full((B, max(plens) + max_new_tokens), pad, dtype=torch.int64, device=tokens.device)
    for b in range(B):
        n = plens[b] + int(generated[b])
        seq[b, :n] = tokens[b, :n]
    stats.generated_tokens = int(sum(generated))
    stats.batch_size = B
    stats.sequence_steps = sum(len(a) for a in accepted)
    return APDOutput(
        sequences=seq,
        num_generated=torch.tensor([int(g) for g in generated], dtype=torch.int64),
        accepted_per_step=accepted,
        stats=stats,
        prompt_lengths=plens,
    )
