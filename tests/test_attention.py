"""window_attention on the CPU against the fp64 reference (DESIGN.md §5):
ragged windows, padding rows, GQA, odd head dims, strided inputs, three
dtypes; opcheck; batch and thread-count invariance; bad inputs."""
import pytest
import torch
from attention_utils import (COMMON_CASES, NAN_CASE, assert_attention_close, assert_nan_rule, make_case,
                             nan_injections)

from apd_ext import ops, reference

DTYPES = [torch.float32, torch.bfloat16, torch.float16]

# name -> make_case kwargs: the cases shared with the CUDA tests.
CASES = dict(COMMON_CASES)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("name", list(CASES))
def test_against_reference(name, causal, dtype):
    c = make_case(dtype=dtype, seed=list(CASES).index(name), **CASES[name])
    out = ops.window_attention(*c.args(), causal=causal)
    assert out.is_contiguous()
    assert_attention_close(out, *c.args(), causal=causal, what=name)


@pytest.mark.parametrize("D", [40, 128])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_nan_propagates(causal, dtype, D):
    """NaN in q, in a visible key, in a visible value: the row is NaN (as SDPA);
    NaN in keys and values no row sees: output unchanged (docs/SEMANTICS.md)."""
    c = make_case(dtype=dtype, seed=7, D=D, **NAN_CASE)
    clean = ops.window_attention(*c.args(), causal=causal)
    assert_attention_close(clean, *c.args(), causal=causal)
    counts = {}
    for what, cn in nan_injections(c, causal):
        out = ops.window_attention(*cn.args(), causal=causal)
        counts[what] = assert_nan_rule(out, clean, cn, causal=causal, what=what)
    # q: one valid row; key 40: every row of sequence 0, kv head 1 (2 query
    # heads); value 60: kv head 0's 2 heads, all 21 rows or (causal) rows 10-20.
    assert counts == {"q": 1, "visible_key": 2 * 21, "visible_value": 2 * (11 if causal else 21),
                      "invisible_key": 0}, counts


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_custom_scale_and_strided_d(causal):
    """scale is honoured; q and v with stride != 1 along D go through a copy."""
    c = make_case(Lq=12, Lmax=80, Hq=4, Hkv=1, D=32, q_start=[60, 3], q_len=[12, 5], kv_len=[80, 40])
    def stride2(t):  # same values, stride 2 along D
        big = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)
        big[..., ::2] = t
        return big[..., ::2]

    q, v = stride2(c.q), stride2(c.v_cache)
    assert q.stride(-1) != 1 and v.stride(-1) != 1
    args = (q, c.k_cache, v, c.q_start, c.q_len, c.kv_len)
    out = ops.window_attention(*args, causal=causal, scale=0.37)
    assert_attention_close(out, *args, causal=causal, scale=0.37)
    # torch.ops directly (no wrapper): the C++ side copies too
    direct = torch.ops.apd.window_attention(*args, causal, 0.37)
    torch.testing.assert_close(direct, out, rtol=0, atol=0)


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_fp32_d256_many_seeds(causal):
    """fp32 at D = 256 (the CUDA tests' d256 case) over 40 seeds: one
    sequential chain of 256 products per score failed the tolerance rule on 11
    of these 80 cases (err up to 1.45e-6 against a bound of 1.0e-6)."""
    kw = dict(Lq=5, Lmax=90, Hq=2, Hkv=1, D=256, q_start=[80, 0], q_len=[5, 2], kv_len=[90, 33])
    for seed in range(40):
        c = make_case(dtype=torch.float32, seed=seed, **kw)
        out = ops.window_attention(*c.args(), causal=causal)
        assert_attention_close(out, *c.args(), causal=causal, what=f"seed {seed}")


@pytest.mark.parametrize(
    "kw",
    [
        dict(Lq=3, Lmax=5, Hq=2, Hkv=1, D=1, q_start=[1], q_len=[3], kv_len=[4]),
        dict(Lq=3, Lmax=5, Hq=2, Hkv=2, D=3, q_start=[0, 0], q_len=[0, 1], kv_len=[0, 1]),  # an empty cache
        dict(Lq=1, Lmax=700, Hq=1, Hkv=1, D=256, q_start=[699], q_len=[1], kv_len=[700]),  # one decode row
        dict(Lq=2, Lmax=9, Hq=5, Hkv=5, D=17, q_start=[7], q_len=[2], kv_len=[9]),
    ],
    ids=["d1", "empty_cache", "d256_decode", "d17"],
)
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_edge_shapes(kw, causal):
    c = make_case(**kw)
    out = ops.window_attention(*c.args(), causal=causal)
    assert_attention_close(out, *c.args(), causal=causal)


def test_empty_tensors():
    no_rows = dict(Lq=0, Lmax=0, q_start=[0], q_len=[0], kv_len=[0])
    no_batch = dict(Lq=4, Lmax=6, q_start=[], q_len=[], kv_len=[])
    for kw in (no_rows, no_batch):
        c = make_case(Hq=2, Hkv=1, D=8, **kw)
        assert ops.window_attention(*c.args(), causal=True).shape == c.q.shape


def test_traces_under_torch_compile():
    c = make_case(Lq=5, Lmax=20, Hq=4, Hkv=2, D=16, q_start=[3], q_len=[5], kv_len=[12])
    fn = torch.compile(lambda *a: ops.window_attention(*a, causal=True), backend="eager", fullgraph=True)
    assert torch.equal(fn(*c.args()), ops.window_attention(*c.args(), causal=True))


def test_window_semantics_by_hand():
    """One tiny case against hand-built softmaxes, independent of the reference's mask code."""
    torch.manual_seed(3)
    q = torch.randn(1, 3, 2, 8, dtype=torch.float64).float()
    k = torch.randn(1, 6, 1, 8).float()
    v = torch.randn(1, 6, 1, 8).float()
    qs, ql, kl = torch.tensor([2]), torch.tensor([2]), torch.tensor([5])
    for causal in (False, True):
        out = ops.window_attention(q, k, v, qs, ql, kl, causal=causal, scale=0.5)
        for j in range(3):
            for h in range(2):
                if j >= 2:
                    expect = torch.zeros(8, dtype=torch.float64)
                else:
                    n = min(5, 2 + j + 1) if causal else 5
                    p = torch.softmax(k[0, :n, 0].double() @ q[0, j, h].double() * 0.5, dim=0)
                    expect = p @ v[0, :n, 0].double()
                torch.testing.assert_close(out[0, j, h].double(), expect, rtol=1e-5, atol=1e-6)


def test_batch_and_thread_invariance():
    """A sequence's output does not depend on its batch mates nor on the thread
    count (each row walks the same key blocks in the same order)."""
    c = make_case(
        Lq=21, Lmax=140, Hq=14, Hkv=2, D=64, q_start=[0, 100, 30], q_len=[21, 13, 1], kv_len=[21, 140, 90],
        dtype=torch.bfloat16,
    )
    full = ops.window_attention(*c.args(), causal=True)
    for b in range(3):
        one = ops.window_attention(*(t[b : b + 1] for t in c.args()), causal=True)
        assert torch.equal(one[0], full[b])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = ops.window_attention(*c.args(), causal=True)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(single, full)


def test_reference_fp32_request():
    c = make_case(Lq=5, Lmax=30, Hq=2, Hkv=1, D=16, q_start=[10], q_len=[4], kv_len=[30])
    r64 = reference.window_attention(*c.args(), causal=True)
    r32 = reference.window_attention(*c.args(), causal=True, compute_dtype=torch.float32)
    assert r64.dtype == torch.float64 and r32.dtype == torch.float32
    torch.testing.assert_close(r32.double(), r64, rtol=1e-5, atol=1e-6)
    assert torch.all(r64[0, 4:] == 0)


@pytest.mark.parametrize("causal", [False, True])
def test_opcheck(causal):
    c = make_case(
        Lq=9, Lmax=70, Hq=6, Hkv=2, D=24, q_start=[3, 60], q_len=[9, 4], kv_len=[20, 70],
        dtype=torch.bfloat16, noncontig_q=True, len_dtype=torch.int32,
    )
    torch.library.opcheck(torch.ops.apd.window_attention.default, (*c.args(), causal, 0.2))


# --------------------------------------------------------------------------- bad inputs


def _good():
    return make_case(Lq=6, Lmax=20, Hq=4, Hkv=2, D=16, q_start=[2, 0], q_len=[6, 3], kv_len=[10, 3])


def _call(c, **over):
    args = dict(
        q=c.q, k_cache=c.k_cache, v_cache=c.v_cache, q_start=c.q_start, q_len=c.q_len, kv_len=c.kv_len
    )
    kw = {"causal": over.pop("causal", False)}
    if "scale" in over:
        kw["scale"] = over.pop("scale")
    args.update(over)
    return ops.window_attention(*args.values(), **kw)


BAD = {
    "mismatched_heads": (lambda c: dict(k_cache=c.k_cache[:, :, :1].expand(-1, -1, 3, -1),
                                         v_cache=c.v_cache[:, :, :1].expand(-1, -1, 3, -1)), "k_cache"),
    "head_dim": (lambda c: dict(k_cache=c.k_cache[..., :8], v_cache=c.v_cache[..., :8]), "k_cache"),
    "v_shape": (lambda c: dict(v_cache=c.v_cache[:, :10]), "v_cache"),
    "batch": (lambda c: dict(k_cache=c.k_cache[:1], v_cache=c.v_cache[:1]), "k_cache"),
    "rank": (lambda c: dict(q=c.q[0]), "q"),
    "kv_len_gt_lmax": (lambda c: dict(kv_len=torch.tensor([21, 3])), "kv_len"),
    "window_past_kv": (lambda c: dict(kv_len=torch.tensor([7, 3])), "kv_len"),
    "q_len_gt_lq": (lambda c: dict(q_len=torch.tensor([7, 3]), kv_len=torch.tensor([12, 3])), "q_len"),
    "neg_q_len": (lambda c: dict(q_len=torch.tensor([6, -1])), "q_len"),
    "neg_q_start": (lambda c: dict(q_start=torch.tensor([-1, 0])), "q_start"),
    "q_dtype": (lambda c: dict(q=c.q.double()), "q"),
    "kv_dtype": (lambda c: dict(k_cache=c.k_cache.bfloat16()), "k_cache"),
    "float_lengths": (lambda c: dict(kv_len=c.kv_len.float()), "kv_len"),
    "len_shape": (lambda c: dict(q_len=c.q_len[:1]), "q_len"),
    "meta_q": (lambda c: dict(q=c.q.to("meta")), "q"),
    "mixed_device": (lambda c: dict(v_cache=c.v_cache.to("meta")), "v_cache"),
    "len_device": (lambda c: dict(q_start=c.q_start.to("meta")), "q_start"),
    "scale_zero": (lambda c: dict(scale=0.0), "scale"),
    "scale_nan": (lambda c: dict(scale=float("nan")), "scale"),
    "scale_inf": (lambda c: dict(scale=float("inf")), "scale"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_inputs_raise_naming_the_argument(name):
    c = _good()
    make, arg = BAD[name]
    with pytest.raises(ValueError, match=rf"^{arg}:"):
        _call(c, **make(c))


@pytest.mark.parametrize(
    "over,arg",
    [
        (dict(kv_len=[10, 3]), "kv_len"),
        (dict(scale="0.5"), "scale"),
        (dict(scale=True), "scale"),
        (dict(causal=1), "causal"),
        (dict(q=None), "q"),
    ],
)
def test_bad_types_raise_type_error(over, arg):
    with pytest.raises(TypeError, match=rf"^{arg}:"):
        _call(_good(), **over)


def test_direct_op_checks_values():
    """torch.ops.apd.window_attention refuses bad lengths itself (no crash, no OOB read)."""
    c = _good()
    for kv in ([30, 3], [7, 3], [10, -1]):
        with pytest.raises(RuntimeError, match="window_attention"):
            torch.ops.apd.window_attention(c.q, c.k_cache, c.v_cache, c.q_start, c.q_len, torch.tensor(kv), False, 0.25)
    with pytest.raises(RuntimeError, match="kv heads"):
        k = c.k_cache[:, :, :1].expand(-1, -1, 3, -1)
        torch.ops.apd.window_attention(c.q, k, k, c.q_start, c.q_len, c.kv_len, False, 0.25)


def test_valid_lengths_unchecked_flag_same_result():
    c = _good()
    a = ops.window_attention(*c.args(), causal=True)
    b = ops.window_attention(*c.args(), causal=True, check_lengths=False)
    assert torch.equal(a, b)
