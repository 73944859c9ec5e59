"""Preallocated per-model KV cache for the APD step (DESIGN.md §6).

Storage is one stacked tensor per K and V, [layers, B, max_len + 1, Hkv, D].
Position max_len of every sequence is a scratch slot: the forward sends the K/V
of padding rows (j >= q_len[b], or positions >= max_len) there, so that one
fixed-shape scatter serves every ragged batch (and CUDA graphs) without ever
touching a valid position. The scratch slot is never read: kv_len <= max_len.

lengths [B] int64 is the valid prefix of each sequence. Rolling back is only
lowering lengths (crop): no data moves, nothing is reallocated.

A batch of live sequences is kept in rows 0 .. n-1 of a capacity-B cache:
view(a, b) is the cache of sequences a .. b-1 sharing the storage (the live
rows, a join's new rows), and compact_ moves the survivors of a batch to the
front with one gather, so views (and CUDA graphs captured on them) stay valid.
"""
from __future__ import annotations

import operator
from typing import Optional, Union

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

    @classmethod
    def _of(cls, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor, max_len: int) -> "KVCache":
        """A cache over existing storage (no allocation): k, v [layers, B, max_len + 1, Hkv, D], lengths [B]."""
        self = cls.__new__(cls)
        self._k, self._v, self.lengths = k, v, lengths
        self.batch_size, self.max_len, self.num_layers = k.shape[1], max_len, k.shape[0]
        return self

    def view(self, a: int, b: int) -> "KVCache":
        """A VIEW of sequences a .. b-1 (same storage, lengths a view too): writes
        through it land in this cache. CUDA graphs captured on a view stay valid
        while nothing reallocates the storage (compact_ moves data in place)."""
        a, b = _index("a", a), _index("b", b)
        if not (0 <= a < b <= self.batch_size):
            fail("a, b", f"0 <= a < b <= {self.batch_size} (the cache's batch size)", (a, b))
        # [layers, b-a, max_len + 1, Hkv, D] each; lengths [b-a]
        return KVCache._of(self._k[:, a:b], self._v[:, a:b], self.lengths[a:b], self.max_len)

    def compact_(self, keep: torch.Tensor, upto: Optional[int] = None) -> None:
        """Batch compaction in place: sequences `keep` ([n] int64 on the cache's
        device; a subset or a permutation of the rows) move to rows 0 .. n-1 (one
        gather of K and V). upto: a host bound on every kept sequence's length:
        only positions [0, upto) move, since nothing past a sequence's length is
        ever read before it is written. The Engine's caches are max_len wide
        (4096 by default) and compaction runs whenever a request leaves, so moving
        the whole width would cost in proportion to max_len, not to what is used."""
        n = keep.numel()
        w = self._k.shape[2] if upto is None else min(int(upto), self._k.shape[2])
        self._k[:, :n, :w] = self._k[:, :, :w].index_select(1, keep)
        self._v[:, :n, :w] = self._v[:, :, :w].index_select(1, keep)
        self.lengths[:n] = self.lengths.index_select(0, keep)

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
