"""Preallocated per-model KV cache for the APD step (DESIGN.md §6).

Storage is one stacked tensor per K and V, [layers, B, max_len + 1, Hkv, D].
Position max_len of every sequence is a scratch slot: the forward sends the K/V
of padding rows (j >= q_len[b], or positions >= max_len) there, so that one
fixed-shape scatter serves every ragged batch (and CUDA graphs) without ever
touching a valid position. The scratch slot is never read: kv_len <= max_len.

lengths [B] int64 is the valid prefix of each sequence. Rolling back is only
lowering lengths (crop): no data moves, nothing is reallocated.
"""
from __future__ import annotations

import operator
from typing import Union

import torch

from apd_ext._validate import check_tensor, fail


def _index(name: str, x) -> int:
    try:
        return operator.index(x)  # int, numpy integer, 0-d integer tensor
    except TypeError:
        raise TypeError(f"{name}: expected an integer, got {type(x).__name__}") from None


class KVCache:
    def __init__(
        self,
        num_layers: int,
        batch_size: int,
        max_len: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        dtype: torch.dtype,
        device: Union[str, torch.device],
    ):
        if batch_size < 1:
            fail("batch_size", "an integer >= 1", batch_size)
        if max_len < 1:
            fail("max_len", "an integer >= 1", max_len)
        shape = (num_layers, batch_size, max_len + 1, num_kv_heads, head_dim)
        self._k = torch.zeros(shape, dtype=dtype, device=device)  # [layers, B, max_len + 1, Hkv, D]
        self._v = torch.zeros(shape, dtype=dtype, device=device)  # [layers, B, max_len + 1, Hkv, D]
        self.lengths = torch.zeros(batch_size, dtype=torch.int64, device=device)  # [B]
        self.batch_size = batch_size
        self.max_len = max_len
        self.num_layers = num_layers

    @property
    def k(self) -> torch.Tensor:
        """[layers, B, max_len, Hkv, D] view of the keys (scratch slot excluded)."""
        return self._k[:, :, : self.max_len]

    @property
    def v(self) -> torch.Tensor:
        """[layers, B, max_len, Hkv, D] view of the values (scratch slot excluded)."""
        return self._v[:, :, : self.max_len]

    @property
    def device(self) -> torch.device:
        return self._k.device

    @property
    def dtype(self) -> torch.dtype:
        return self._k.dtype

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Contiguous (k, v) storage of layer i, each [B, max_len + 1, Hkv, D] (scratch slot last)."""
        return self._k[i], self._v[i]

    def crop(self, b: int, length: int) -> None:
        """Keep at most `length` positions of sequence b (lengths[b] = min(lengths[b], length)).

        Never extends a sequence: positions past the old length were not computed."""
        b, length = _index("b", b), _index("length", length)
        if not (0 <= b < self.batch_size):
            fail("b", f"a sequence index in [0, {self.batch_size})", b)
        if length < 0:
            fail("length", "an integer >= 0", length)
        self.lengths[b].clamp_(max=length)

    def crop_(self, lengths: torch.Tensor) -> None:
        """Batched crop: lengths = min(lengths, new) in place; new is int [B] on the cache's device."""
        check_tensor(
            "lengths",
            lengths,
            ndim=1,
            dtypes=(torch.int32, torch.int64),
            device=self.device,
            shape=(self.batch_size,),
        )
        torch.minimum(self.lengths, lengths.to(torch.int64), out=self.lengths)

    def reset(self) -> None:
        """Forget every sequence (lengths = 0); the storage is kept."""
        self.lengths.zero_()

    def __repr__(self) -> str:
        L, B, _, H, D = self._k.shape
        return (
            f"KVCache(layers={L}, batch_size={B}, max_len={self.max_len}, kv_heads={H}, head_dim={D}, "
            f"dtype={self.dtype}, device={self.device})"
        )
