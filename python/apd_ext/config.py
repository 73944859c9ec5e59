"""APDConfig: the knobs of one APD generation (../shared/DESIGN.md §1, §4, §6).

Validated on construction and on every ``dataclasses.replace``: a bad value
raises a ValueError/TypeError naming the field, what was expected and what came.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

from apd_ext._validate import check_choice, check_range, fail

ACCEPTANCE_MODES = ("coupled", "argmax")
COMPAT_MODES = (None, "official")


def _check_int(name: str, value, lo: int, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        what = "an int or None" if allow_none else "an int"
        raise TypeError(f"{name}: expected {what}, got {type(value).__name__}")
    if value < lo:
        fail(name, f"an int >= {lo}" + (" or None" if allow_none else ""), value)


@dataclass
class APDConfig:
    """Adaptive Parallel Decoding settings.

    R: mixture weight in [0, 1] (higher = faster, more dLLM).
    W: recompute-KV window (>= 1); None disables the dLLM KV cache (every step
       recomputes the whole prefix).
    M: maximum masked lookahead (>= 1).
    temperature, top_p, top_k: sampling filter of DESIGN §4 (temperature 0 =
       argmax; top_k 0 = off; top_p 1 = off).
    acceptance: "coupled" (Algorithm 1, default) or "argmax" (released code).
    compat: None or "official" (released code's sampling; implies
       acceptance="argmax", which is the only mode that code has).
    max_new_tokens: generation budget (>= 1); seed: uint64 seed of the noise.
    """

    R: float = 0.7
    W: Optional[int] = 16
    M: int = 100
    temperature: float = 0.2
    top_p: float = 0.95
    top_k: int = 0
    acceptance: str = "coupled"
    compat: Optional[str] = None
    max_new_tokens: int = 256
    seed: int = 0

    def __post_init__(self) -> None:
        check_range("R", self.R, 0.0, 1.0)
        _check_int("W", self.W, 1, allow_none=True)
        _check_int("M", self.M, 1)
        check_range("temperature", self.temperature, 0.0, float("inf"))
        check_range("top_p", self.top_p, 0.0, 1.0)
        if self.top_p <= 0.0:
            fail("top_p", "a value in (0, 1]", self.top_p)
        _check_int("top_k", self.top_k, 0)
        check_choice("acceptance", self.acceptance, ACCEPTANCE_MODES)
        check_choice("compat", self.compat, COMPAT_MODES)
        _check_int("max_new_tokens", self.max_new_tokens, 1)
        _check_int("seed", self.seed, 0)
        if self.seed >= 2**64:
            fail("seed", "an int in [0, 2^64)", self.seed)
        if self.compat == "official":
            # The released code only has argmax acceptance (DESIGN §4).
            self.acceptance = "argmax"

    def replace(self, **overrides) -> "APDConfig":
        """A copy with some fields changed (validated again)."""
        unknown = set(overrides) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise TypeError(
                f"unknown APDConfig field(s) {sorted(unknown)}; expected some of "
                f"{[f.name for f in dataclasses.fields(self)]}"
            )
        return dataclasses.replace(self, **overrides)

    @property
    def sampling_acceptance(self) -> Optional[str]:
        """The acceptance argument passed to the ops (None under compat='official')."""
        return None if self.compat == "official" else self.acceptance
