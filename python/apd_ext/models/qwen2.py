"""The Qwen2-architecture forward (Qwen2 / Qwen2.5 and Qwen3 causal, Dream
bidirectional) over the apd window_attention kernel and a preallocated KVCache.
Qwen3's differences are data on the layer (no q/k/v bias, a per-head q/k
RMSNorm before RoPE, head_dim independent of hidden / heads), not a second model.

One forward processes a window of Lw rows per sequence: row j of sequence b is
absolute position q_start[b] + j, valid while j < q_len[b]. Its K/V are written
into the cache at [q_start, q_start + q_len), attention reads cache positions
[0, q_start + q_len) (causally for "ar", bidirectionally for "dllm"), and
cache.lengths becomes q_start + q_len.

Logits are RAW per-position logits: row j is the LM head applied to the hidden
state at position q_start + j. Dream predicts token i from row i - 1 (shifted
logits, DESIGN.md §6); applying that shift is the caller's business: ask for
logit rows (t - 1 - q_start) .. (right - 2 - q_start) to score positions t .. right - 1.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from apd_ext._validate import check_tensor, fail
from apd_ext.models.cache import KVCache
from apd_ext.models.config import ModelConfig
from apd_ext.models.packing import Packing, check_packing

# Internal switch for debugging only: "ops" calls the apd kernel (the one
# production path, and what the tests run); "reference" calls the fp64 oracle.
_ATTENTION = "ops"
# Internal switch for benchmarking only: False runs every forward over the
# padded [B, Lw] rows, ignoring a packing plan, on the CPU as on CUDA (the A/B
# of the packing in forward, bench/bench_packing.py).
_PACK = True


def _window_attention(q, k_cache, v_cache, q_start, q_len, kv_len, causal):
    if _ATTENTION == "ops":
        from apd_ext import ops

        # The forward has already bounded the lengths (on CPU) or redirects
        # out-of-range rows to the scratch slot: no host-side re-check, so the
        # CUDA path never synchronises and stays graph-capturable.
        return ops.window_attention(q, k_cache, v_cache, q_start, q_len, kv_len, causal=causal, check_lengths=False)
    from apd_ext import reference

    out = reference.window_attention(q, k_cache, v_cache, q_start, q_len, kv_len, causal=causal)
    return out.to(q.dtype)


@dataclass
class _Layer:
    w_qkv: torch.Tensor  # [(Hq + 2 Hkv) D, H]   q, k, v projections stacked once at load
    b_qkv: Optional[torch.Tensor]  # [(Hq + 2 Hkv) D], None without q/k/v bias (Qwen3)
    qk_norm: Optional[torch.Tensor]  # [Hq + Hkv, D] q_norm rows then k_norm rows (Qwen3), else None
    w_o: torch.Tensor  # [H, Hq D]
    w_gate: torch.Tensor  # [I, H]
    w_up: torch.Tensor  # [I, H]
    w_down: torch.Tensor  # [H, I]
    w_gate_up: Optional[torch.Tensor]  # [2 I, H] when fused (w_gate / w_up are then views of it)
    ln_attn: torch.Tensor  # [H]
    ln_mlp: torch.Tensor  # [H]


def _rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    # One fused kernel on CUDA (fp32 accumulation). Qwen2RMSNorm rounds the
    # normalised row to the model dtype before scaling; this rounds once, after:
    # the same in fp32, within one ulp in bf16/fp16, and 4 kernels fewer.
    return F.rms_norm(x, (x.shape[-1],), weight=w, eps=eps)


def _add_linear_(x: torch.Tensor, a: torch.Tensor, w: torch.Tensor, segs: Optional[list] = None) -> torch.Tensor:
    # x += a @ w.T in one GEMM (the residual is the epilogue's C, beta = 1).
    rows = x.view(-1, x.shape[-1])  # [N, H]
    a = a.reshape(rows.shape[0], -1)  # [N, w.shape[1]]
    if segs is None:
        rows.addmm_(a, w.t())
        return x
    for s, e in segs:  # the batch-invariant plan: one GEMM per sequence (see _linear)
        rows[s:e] = torch.addmm(rows[s:e].clone(), a[s:e].clone(), w.t())
    return x


def _linear(a: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor], segs: Optional[list]) -> torch.Tensor:
    """F.linear(a, w, b) over the rows of a; segs (host [(start, end)] of each
    sequence's rows, Packing.per_request): one GEMM per sequence instead, so
    that a row's result depends on its own sequence's row count only. BLAS
    libraries pick the kernel, its tiles and split-K from the GEMM's shape
    (MKL / oneDNN on the CPU, cuBLAS heuristics on CUDA): over the step's rows
    a request's logits moved with its batch-mates (tiny pair, CPU: 7.6e-6 in
    fp32, 0.0625 in a bf16 verifier; bench/batch_invariance_check.py). Each
    sequence's rows are copied to a fresh allocation first: its offset in the
    packed rows comes from its batch-mates, and a BLAS may choose its path by
    the operands' alignment. The price: B GEMMs of a request's rows each
    instead of one (the weights are read B times per step)."""
    if segs is None:
        return F.linear(a, w, b)
    a2 = a.reshape(-1, a.shape[-1])  # [rows, K]
    out = a2.new_zeros(a2.shape[0], w.shape[0])  # rows outside every segment: zeros
    for s, e in segs:
        out[s:e] = F.linear(a2[s:e].clone(), w, b)
    return out.view(*a.shape[:-1], w.shape[0])


def _rope(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    # HF's x * cos + rotate_half(x) * sin, with rotate_half(x) * sin written as
    # roll(x, D/2) * [-sin, sin] (the same products, three kernels instead of five).
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, dims=-1), sin_signed)


class Qwen2Runtime:
    """A loaded Qwen2 / Dream model. Build with apd_ext.load_model."""

    def __init__(
        self, kind: str, config: ModelConfig, tensors: dict, *, path: Optional[str] = None, fuse_mlp: bool = True
    ):
        """tensors: the checkpoint's tensors by name, already on the device and in
        the dtype. q/k/v are concatenated here (a copy) unless tensors already
        holds the fused "self_attn.qkv_proj.weight" / ".bias"; fuse_mlp also
        stacks gate/up into one GEMM (a copy, so load_model skips it for live
        models) unless "mlp.gate_up_proj.weight" is given (then used as is)."""
        self.kind = kind
        self.config = config
        self.path = path
        self.causal = kind == "ar"
        emb = tensors["model.embed_tokens.weight"]
        self.dtype = emb.dtype
        self.device = emb.device
        self.embed = emb  # [V, H]
        self.lm_head = emb if config.tie_word_embeddings else tensors["lm_head.weight"]  # [V, H]
        self.norm = tensors["model.norm.weight"]  # [H]
        self.layers = []
        for i in range(config.num_layers):
            p = f"model.layers.{i}."
            t = lambda n: tensors[p + n]  # noqa: E731
            # The fused buffers come from load_model when it read them in place
            # (a folder); otherwise they are stacked here (a copy).
            gate, up = t("mlp.gate_proj.weight"), t("mlp.up_proj.weight")
            gate_up = tensors.get(p + "mlp.gate_up_proj.weight")
            if gate_up is None and fuse_mlp:
                gate_up = torch.cat([gate, up])
            if gate_up is not None:
                gate, up = gate_up[: config.intermediate_size], gate_up[config.intermediate_size :]
            w_qkv = tensors.get(p + "self_attn.qkv_proj.weight")
            b_qkv = tensors.get(p + "self_attn.qkv_proj.bias")
            self.layers.append(
                _Layer(
                    w_qkv=w_qkv if w_qkv is not None else torch.cat([t(f"self_attn.{n}_proj.weight") for n in "qkv"]),
                    b_qkv=(b_qkv if b_qkv is not None else torch.cat([t(f"self_attn.{n}_proj.bias") for n in "qkv"]))
                    if config.qkv_bias else None,
                    qk_norm=torch.cat([t("self_attn.q_norm.weight").expand(config.num_heads, -1),
                                       t("self_attn.k_norm.weight").expand(config.num_kv_heads, -1)])
                    if config.qk_norm else None,
                    w_o=t("self_attn.o_proj.weight"),
                    w_gate=gate,
                    w_up=up,
                    w_gate_up=gate_up,
                    w_down=t("mlp.down_proj.weight"),
                    ln_attn=t("input_layernorm.weight"),
                    ln_mlp=t("post_attention_layernorm.weight"),
                )
            )
        D = config.head_dim
        # As Qwen2RotaryEmbedding (default rope): fp32 inverse frequencies [D/2].
        exponents = torch.arange(0, D, 2, dtype=torch.int64).to(device=self.device, dtype=torch.float) / D
        self.inv_freq = 1.0 / (config.rope_theta**exponents)  # [D/2]

    def __repr__(self) -> str:
        c = self.config
        return (
            f"Qwen2Runtime(kind={self.kind!r}, model_type={c.model_type!r}, layers={c.num_layers}, "
            f"hidden={c.hidden_size}, heads={c.num_heads}/{c.num_kv_heads}, vocab={c.vocab_size}, "
            f"dtype={self.dtype}, device={self.device}, path={self.path!r})"
        )

    def new_cache(self, batch_size: int, max_len: int) -> KVCache:
        """A KV cache for batch_size sequences of up to max_len positions (prompt included)."""
        c = self.config
        return KVCache(
            c.num_layers, batch_size, max_len, c.num_kv_heads, c.head_dim, dtype=self.dtype, device=self.device
        )

    def graphed(self, cache: KVCache, window: int, n_rows: Optional[int] = None):
        """A CUDA graph of forward for (cache.batch_size, window) rows on `cache` (see graphs.py)."""
        from apd_ext.models.graphs import GraphedForward

        return GraphedForward(self, cache, window, n_rows=n_rows)

    # ------------------------------------------------------------------ checks
    def _check_args(self, input_ids, cache, q_start, q_len, logit_rows):
        check_tensor("input_ids", input_ids, ndim=2, dtypes=(torch.int64,), device=self.device)
        B, Lw = input_ids.shape
        if Lw < 1:
            fail("input_ids", "a window of >= 1 rows", list(input_ids.shape))
        if not isinstance(cache, KVCache):
            raise TypeError(f"cache: expected a KVCache (model.new_cache), got {type(cache).__name__}")
        c = self.config
        kshape = tuple(cache._k.shape)
        want = (c.num_layers, B, cache.max_len + 1, c.num_kv_heads, c.head_dim)
        if kshape != want or cache.dtype != self.dtype or cache.device != self.device:
            fail(
                "cache",
                f"a cache of this model for batch {B} ({c.num_layers} layers, {c.num_kv_heads} kv heads, "
                f"head_dim {c.head_dim}, {self.dtype}, {self.device})",
                repr(cache),
            )
        for name, t in (("q_start", q_start), ("q_len", q_len)):
            check_tensor(name, t, ndim=1, dtypes=(torch.int32, torch.int64), device=self.device, shape=(B,))
        n_rows = None
        if logit_rows is not None:
            if not (isinstance(logit_rows, tuple) and len(logit_rows) == 2):
                raise TypeError("logit_rows: expected None or a tuple (row_start [B] int tensor, n_rows int)")
            row_start, n_rows = logit_rows
            check_tensor(
                "logit_rows[0]", row_start, ndim=1, dtypes=(torch.int32, torch.int64), device=self.device, shape=(B,)
            )
            if not isinstance(n_rows, int) or not (1 <= n_rows <= Lw):
                fail("logit_rows[1]", f"an int in [1, {Lw}]", n_rows)
        # Value checks only where they cost no device synchronisation.
        if self.device.type == "cpu":
            if bool((q_len < 0).any()) or bool((q_len > Lw).any()):
                fail("q_len", f"values in [0, {Lw}]", q_len.tolist())
            if bool((q_start < 0).any()) or bool((q_start + q_len > cache.max_len).any()):
                want = f"q_start >= 0 and q_start + q_len <= cache.max_len ({cache.max_len})"
                fail("q_start", want, q_start.tolist())
            if logit_rows is not None:
                rs = logit_rows[0]
                if bool((rs < 0).any()) or bool((rs + n_rows > Lw).any()):
                    fail("logit_rows[0]", f"row starts in [0, {Lw - n_rows}]", rs.tolist())

    # ----------------------------------------------------------------- forward
    @torch.no_grad()
    def forward(
        self,
        input_ids: torch.Tensor,  # [B, Lw] int64
        cache: KVCache,
        q_start: torch.Tensor,  # [B] int, absolute position of row 0
        q_len: torch.Tensor,  # [B] int, valid rows (rows >= q_len are padding)
        logit_rows=None,  # None, or (row_start [B] int, n_rows int)
        packing: Optional[Packing] = None,  # the host plan of the valid rows (models/packing.py)
    ) -> torch.Tensor:  # [B, Lw, V] or [B, n_rows, V], model dtype
        """Run the window, update the cache, return raw logits (see the module docstring).

        packing: Packing.build(q_len_host, Lw, device) for these q_len: every
        row-wise op then runs on the N = sum(q_len) valid rows only, on CUDA
        as on the CPU, without a host synchronisation. It must describe the
        q_len passed (checked on the CPU; trusted on CUDA, where a mismatch
        leaves valid rows uncomputed). Without it the CPU packs by itself
        (valid.nonzero()) and CUDA runs every B * Lw row (the graphs' layout).

        Padding rows (j >= q_len[b]) never touch the cache's valid positions and
        their logits are finite but meaningless. Value checks on q_start / q_len
        run on CPU only; on CUDA, out-of-range rows are redirected to the
        cache's scratch slot (memory-safe, but the caller must pass sane values).
        Cache positions [0, q_start) are read as they are (the dLLM's stale
        prefix is by design); nothing checks that they were ever written.
        """
        self._check_args(input_ids, cache, q_start, q_len, logit_rows)
        c = self.config
        B, Lw = input_ids.shape
        check_packing(packing, B, Lw, self.device)
        if packing is not None and self.device.type == "cpu" and not torch.equal(packing.q_len, q_len.to(torch.int64)):
            fail("packing", f"a plan of these q_len ({q_len.tolist()})", packing.q_len.tolist())
        # The batch-invariant plan: every GEMM per sequence (_linear); the LM head
        # over each sequence's own logit rows.
        segs = packing.segments() if packing is not None and packing.per_request else None
        if segs is not None and logit_rows is not None:
            if packing.logit_counts is None:
                fail("packing", "a per_request plan with logit_counts (host [B]) when logit_rows is given",
                     "logit_counts=None")
            if int(packing.logit_counts.max()) > logit_rows[1]:
                fail("packing", f"logit_counts of at most logit_rows[1] ({logit_rows[1]}) rows",
                     packing.logit_counts.tolist())
        Hq, Hkv, D = c.num_heads, c.num_kv_heads, c.head_dim
        dev = self.device
        # Clamps are no-ops for valid input (checked above on CPU); on CUDA they
        # keep bad lengths in bounds for the kernel, which trusts them.
        q_start = q_start.to(torch.int64).clamp(0, cache.max_len)
        q_len = q_len.to(torch.int64).clamp(0, Lw)
        kv_len = (q_start + q_len).clamp_(max=cache.max_len)  # [B]

        j = torch.arange(Lw, device=dev)  # [Lw]
        pos = q_start[:, None] + j  # [B, Lw] absolute positions
        valid = (j < q_len[:, None]) & (pos < cache.max_len)  # [B, Lw]
        slot = torch.where(valid, pos, cache.max_len)  # [B, Lw] cache row to write (scratch if padding)
        bidx = torch.arange(B, device=dev)[:, None].expand(B, Lw)  # [B, Lw]
        ids = torch.where(valid, input_ids, 0)  # [B, Lw]

        # Packed rows: every row-wise op (the GEMMs, norms, RoPE, cache writes,
        # MLP, LM head) runs on the N valid rows only; just the attention
        # kernel sees the padded [B, Lw] layout (its padding queries are zeros).
        # A forward costs in proportion to its rows, so padding rows are pure
        # waste: 20 % of the dLLM's rows in the Engine's closed loop at 16
        # clients (bench/bench_serve.py), and nearly all of them on the step a
        # long prompt joins short decoding rows (bench/NOTES.md, "Packed windows").
        # The rows come from the caller's host plan (no sync: N is a host int);
        # without one, the CPU finds them itself (nonzero() costs nothing
        # there) and CUDA stays dense. N == 0 (a graph capture) and N == B * Lw
        # run the padded layout: packing would change nothing.
        pack = None  # [N] flat rows of [B * Lw], b-major; None: all B * Lw rows
        if _PACK:
            if packing is not None:
                pack = None if packing.dense else packing.index
            elif dev.type == "cpu" and 0 < int(valid.sum()) < B * Lw:
                pack = valid.view(-1).nonzero().flatten()
        if pack is not None:
            pos, slot, bidx, ids = (t.reshape(-1).index_select(0, pack) for t in (pos, slot, bidx, ids))  # [N] each

        # RoPE as Qwen2RotaryEmbedding: fp32 angles, cos/sin rounded to the model dtype.
        freqs = pos.float()[..., None] * self.inv_freq  # [B, Lw, D/2] (packed: [N, D/2])
        cos_h, sin_h = freqs.cos().to(self.dtype), freqs.sin().to(self.dtype)
        cos = torch.cat((cos_h, cos_h), dim=-1)[..., None, :]  # [B, Lw, 1, D]
        sin_signed = torch.cat((-sin_h, sin_h), dim=-1)[..., None, :]  # [B, Lw, 1, D]

        x = F.embedding(ids, self.embed)  # [B, Lw, H] (packed: [N, H])
        lead = x.shape[:-1]
        for i, L in enumerate(self.layers):
            h = _rms_norm(x, L.ln_attn, c.rms_norm_eps)
            qkv = _linear(h, L.w_qkv, L.b_qkv, segs).view(*lead, Hq + 2 * Hkv, D)
            qk = qkv[..., : Hq + Hkv, :]  # q and k heads rotate together
            if L.qk_norm is not None:  # Qwen3: per-head RMSNorm over D, before RoPE
                qk = F.rms_norm(qk, (D,), eps=c.rms_norm_eps) * L.qk_norm  # [.., Hq + Hkv, D]
            qk = _rope(qk, cos, sin_signed)  # [B, Lw, Hq + Hkv, D]
            q = qk[..., :Hq, :]  # [B, Lw, Hq, D]
            k_cache, v_cache = cache.layer(i)  # [B, max_len + 1, Hkv, D] each
            k_cache.index_put_((bidx, slot), qk[..., Hq:, :])
            v_cache.index_put_((bidx, slot), qkv[..., Hq + Hkv :, :])
            if pack is not None:
                q = q.new_zeros(B * Lw, Hq, D).index_copy_(0, pack, q).view(B, Lw, Hq, D)
            attn = _window_attention(q, k_cache, v_cache, q_start, q_len, kv_len, self.causal)  # [B, Lw, Hq, D]
            if pack is not None:
                attn = attn.reshape(B * Lw, Hq * D).index_select(0, pack)  # [N, Hq D]
            x = _add_linear_(x, attn, L.w_o, segs)  # attn [B, Lw, Hq, D] -> rows of Hq D
            h = _rms_norm(x, L.ln_mlp, c.rms_norm_eps)
            if L.w_gate_up is not None:
                gate, up = _linear(h, L.w_gate_up, None, segs).split(c.intermediate_size, dim=-1)
            else:
                gate, up = _linear(h, L.w_gate, None, segs), _linear(h, L.w_up, None, segs)
            x = _add_linear_(x, F.silu(gate) * up, L.w_down, segs)
        cache.lengths.copy_(kv_len)
        if pack is None:
            if logit_rows is not None:
                row_start, n_rows = logit_rows
                rows = (row_start.to(torch.int64)[:, None] + torch.arange(n_rows, device=dev)).clamp_(0, Lw - 1)
                x = x.gather(1, rows[:, :, None].expand(B, n_rows, x.shape[-1]))  # [B, n_rows, H]
            return self._head(x, segs, packing, logit_rows)
        # Packed x: [N, H]. Padding rows come back as zero hidden states: their
        # logits are zeros (finite, meaningless), and the LM head runs on the
        # rows asked for, never on B * Lw.
        if logit_rows is None:
            logits = self._head(x, segs, packing, None)  # [N, V]
            return logits.new_zeros(B * Lw, logits.shape[-1]).index_copy_(0, pack, logits).view(B, Lw, -1)
        row_start, n_rows = logit_rows
        rows = (row_start.to(torch.int64)[:, None] + torch.arange(n_rows, device=dev)).clamp_(0, Lw - 1)  # [B, n_rows]
        first = torch.cumsum(q_len, 0) - q_len  # [B] packed index of each sequence's row 0
        src = torch.where(rows < q_len[:, None], first[:, None] + rows, pack.numel())  # [B, n_rows]; N: a zero row
        x = torch.cat([x, x.new_zeros(1, x.shape[-1])]).index_select(0, src.view(-1)).view(B, n_rows, -1)
        return self._head(x, segs, packing, logit_rows)

    def _head(self, x: torch.Tensor, segs: Optional[list], packing: Optional[Packing], logit_rows) -> torch.Tensor:
        """The final norm and the LM head over x ([rows, H] packed, [B, Lw, H],
        or [B, n_rows, H] with logit_rows). With the batch-invariant plan: one
        GEMM per sequence over its own rows (its logit_counts rows of the
        n_rows asked for; the rest come back as zeros)."""
        h = _rms_norm(x, self.norm, self.config.rms_norm_eps)
        if segs is not None and logit_rows is not None:
            n_rows = x.shape[1]
            segs = [(b * n_rows, b * n_rows + k) for b, k in enumerate(packing.logit_counts.tolist()) if k]
        return _linear(h, self.lm_head, None, segs)

    __call__ = forward
