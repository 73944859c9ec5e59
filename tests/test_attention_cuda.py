"""window_attention on CUDA (DESIGN.md §5) against the fp64 reference and the
CPU kernel, for both CUDA implementations (APD_ATTN_IMPL=simple | mma) and
with the split-KV path forced off, forced on and left to the heuristic
(APD_ATTN_SPLITS). Also: split/no-split agreement, opcheck, CUDA-graph
capture/replay, bad inputs.

Every test runs on the GPU (backend "cuda", skipped without a device) and,
where it is about the kernels' results, on the CPU emulator of the same CUDA
kernels (backend "emu", tests/emu: launchers compiled as host code, every call
run under three thread schedules that must agree bit for bit)."""
import emu_backend
import pytest
import torch
from skips import not_applicable
from attention_utils import (COMMON_CASES, NAN_CASE, assert_attention_close, assert_nan_rule, attention_errors,
                             make_case, nan_injections)

from apd_ext import ops


class Backend:
    name = "cuda"
    dev = "cuda"
    impl = "simple"
    splits = 0


BK = Backend()


# Tests that run on every device profile of the emulator in CI (on a few
# shapes each, emu_quick(..., profile_keep=...)); APD_EMU_FULL=1 runs all.
PROFILE_TESTS = {"test_against_reference", "test_nan_propagates", "test_plan_fits_the_profile",
                 "test_batch_invariance"}


@pytest.fixture(autouse=True, params=emu_backend.backend_params())
def backend(request, monkeypatch):
    """"cuda", or "emu" on the default (H100) profile or on emu-<profile> (the
    test sees "emu"; the profile is the harness's active device)."""
    name = "cuda" if request.param == "cuda" else "emu"
    monkeypatch.setattr(BK, "name", name)
    monkeypatch.setattr(BK, "dev", "cuda" if name == "cuda" else "cpu")
    if name == "cuda":
        yield name
        return
    with emu_backend.on_profile(request.param, request.function.__name__, PROFILE_TESTS):
        yield name


def cuda_only(backend, why):
    if backend == "emu":
        not_applicable(f"needs a device: {why}")


def emu_quick(backend, keep, profile_keep=False):
    """The emulator is ~1000x slower than a device: CI runs every case in bf16
    and the others unsplit, without the two big caches, and on the profiles
    other than the default only the cases `profile_keep` names (APD_EMU_FULL=1: all)."""
    if backend == "emu":
        import emu_backend

        emu_backend.quick(backend, keep)
        emu_backend.profile_quick(profile_keep)


def attn(*args, **kw):
    """ops.window_attention on the selected backend (and kernel / splits on emu)."""
    if BK.name == "cuda":
        return ops.window_attention(*args, **kw)
    import emu_backend

    return emu_backend.EmuOps(attn_impl=BK.impl, attn_splits=BK.splits).window_attention(*args, **kw)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
IMPLS = ["simple", "mma"]

# name -> make_case kwargs: the cases the CPU tests use too, then CUDA-only ones.
CASES = {
    **COMMON_CASES,
    # dLLM decode step at B=1 (Dream-7B heads): the heuristic splits
    "dream_b1": dict(Lq=16, Lmax=1000, Hq=28, Hkv=4, D=128, q_start=[984], q_len=[16], kv_len=[1000]),
    # verifier (Qwen2.5-0.5B heads), ragged, packed k/v, sharp
    "qwen_verifier": dict(
        Lq=20, Lmax=333, Hq=14, Hkv=2, D=64, q_start=[313, 0, 77], q_len=[20, 20, 5], kv_len=[333, 20, 90],
        packed_kv=True, q_gain=3.0,
    ),
    # big cache, short sequences: most splits see no key
    "sparse_cache": dict(Lq=7, Lmax=2000, Hq=4, Hkv=2, D=64, q_start=[40, 0], q_len=[7, 3], kv_len=[47, 300]),
    # largest and smallest head dims of the simple kernel
    "d256": dict(Lq=5, Lmax=90, Hq=2, Hkv=1, D=256, q_start=[80, 0], q_len=[5, 2], kv_len=[90, 33]),
    "d8": dict(Lq=11, Lmax=70, Hq=4, Hkv=4, D=8, q_start=[59], q_len=[11], kv_len=[70]),
}

# Cases that the mma kernel can actually take (bf16/fp16, D in {64, 128}, aligned rows).
MMA_CASES = {"odd_tight_gqa2", "pos0_pad_gqa7", "dream_b1", "qwen_verifier", "sparse_cache"}


def _dtype_id(d):
    return str(d).replace("torch.", "")


@pytest.fixture
def use(monkeypatch):
    """use(impl, splits): select the CUDA implementation and split-KV mode for the next calls."""

    def set_(impl="simple", splits="0"):
        monkeypatch.setenv("APD_ATTN_IMPL", impl)
        monkeypatch.setenv("APD_ATTN_SPLITS", str(splits))
        monkeypatch.setattr(BK, "impl", impl)
        monkeypatch.setattr(BK, "splits", int(splits))

    return set_


def _case(name, dtype, **over):
    kw = dict(CASES[name])
    kw.update(over)
    return make_case(dtype=dtype, device=BK.dev, seed=list(CASES).index(name), **kw)


def _aligned_strided_q(q):
    """Same values, heads interleaved with unused ones: strided but 16-byte aligned rows."""
    B, Lq, Hq, D = q.shape
    big = torch.zeros(B, Lq, 2 * Hq, D, dtype=q.dtype, device=q.device)
    big[:, :, 1::2] = q
    out = big[:, :, 1::2]
    assert not out.is_contiguous()
    return out


def _run(c, causal, **kw):
    out = attn(*c.args(), causal=causal, **kw)
    if BK.name == "cuda":
        torch.cuda.synchronize()
    return out


@pytest.mark.parametrize("splits", ["0", "1", "3"], ids=["auto", "nosplit", "split3"])
@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("impl", IMPLS)
def test_against_reference(use, impl, name, causal, dtype, splits, backend, request):
    if impl == "mma" and (name not in MMA_CASES or dtype == torch.float32):
        not_applicable("the mma kernel does not apply: the simple kernel would run again")
    # Other profiles: the tiles they change (mma D = 128 and simple D = 256
    # on sm_86 / sm_89), in bf16 with the heuristic's split.
    emu_quick(backend, name not in ("dream_b1", "sparse_cache") and (dtype == torch.bfloat16 or splits == "1"),
              profile_keep=name in ("pos0_pad_gqa7", "d256") and dtype == torch.bfloat16 and splits == "0")
    use(impl, splits)
    c = _case(name, dtype)
    out = _run(c, causal)
    assert out.is_contiguous()
    assert_attention_close(out, *c.args(), causal=causal, what=f"{name}/{impl}/splits={splits}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=_dtype_id)
@pytest.mark.parametrize("impl", IMPLS)
def test_aligned_strided_q(use, impl, dtype, backend):
    emu_quick(backend, dtype == torch.bfloat16)
    """A non-contiguous q that keeps 16-byte rows: the mma kernel takes it."""
    use(impl, "2")
    c = _case("qwen_verifier", dtype)
    args = (_aligned_strided_q(c.q),) + c.args()[1:]
    out = attn(*args, causal=True)
    assert_attention_close(out, *args, causal=True, what=f"aligned strided q/{impl}")


@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("impl", IMPLS)
def test_matches_cpu_kernel(use, impl, dtype, backend):
    emu_quick(backend, dtype != torch.float32 or impl == "simple")
    """CUDA and the CPU kernel agree within the reference tolerance of each other."""
    use(impl, "0")
    for name in ("pos0_pad_gqa7", "qwen_verifier", "gqa1_d40_edges"):
        c = _case(name, dtype)
        cuda = _run(c, True)
        cpu = ops.window_attention(*c.to("cpu").args(), causal=True)
        e = attention_errors(cpu, *c.to("cpu").args(), causal=True)
        tol = 2.0 * e["err_sdpa"] + e["round"]
        diff = (cuda.cpu().double() - cpu.double()).abs().max().item()
        assert diff <= tol, (name, diff, e)


@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("impl", IMPLS)
def test_split_equals_unsplit(use, impl, dtype, backend):
    emu_quick(backend, dtype == torch.bfloat16)
    """Splitting the KV range changes only the order of operations: the outputs
    agree to rounding of the output dtype, and padding rows are zero either way."""
    c = _case("qwen_verifier", dtype)
    use(impl, "1")
    one = _run(c, False)
    outs = {}
    for s in ("2", "5", "64"):
        use(impl, s)
        outs[s] = _run(c, False)
    ulp = {torch.float32: 1e-5, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}[dtype]
    for s, o in outs.items():
        torch.testing.assert_close(o, one, rtol=ulp, atol=ulp, msg=lambda m: f"splits={s}: {m}")
        assert torch.all(o[2, 5:] == 0)


@pytest.mark.parametrize("impl", IMPLS)
def test_deterministic(use, impl, backend):
    cuda_only(backend, "run-to-run determinism of the device (the emulator checks its schedules itself)")
    use(impl, "0")
    c = _case("dream_b1", torch.bfloat16)
    a, b = _run(c, False), _run(c, False)
    assert torch.equal(a, b)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("splits", ["1", "4"])
def test_opcheck(use, impl, splits, backend):
    cuda_only(backend, "opcheck of the torch.ops.apd CUDA registration")
    use(impl, splits)
    c = _case("qwen_verifier", torch.bfloat16, len_dtype=torch.int32)
    torch.library.opcheck(torch.ops.apd.window_attention.default, (*c.args(), True, 0.125))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("splits", ["1", "4"])
def test_cuda_graph_replay_equals_eager(use, impl, splits, backend):
    """Capture (workspace included) and replay with new inputs written in place."""
    cuda_only(backend, "CUDA graphs")
    use(impl, splits)
    c = _case("dream_b1", torch.bfloat16, q_start=[900], kv_len=[916])
    args = c.args()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):  # warm-up outside the capture
            ops.window_attention(*args, causal=False, check_lengths=False)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        static_out = ops.window_attention(*args, causal=False, check_lengths=False)
    for step in range(3):
        torch.manual_seed(step)
        c.q.copy_(torch.randn_like(c.q, dtype=torch.float32).to(c.q.dtype))
        c.kv_len.fill_(916 + 7 * step)
        g.replay()
        eager = ops.window_attention(*args, causal=False)
        torch.cuda.synchronize()
        assert torch.equal(static_out, eager), step


# --------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize("D", [12, 264])
def test_unsupported_head_dim_is_a_clear_error(D):
    c = make_case(Lq=3, Lmax=10, Hq=2, Hkv=1, D=D, q_start=[0], q_len=[3], kv_len=[5], device=BK.dev)
    with pytest.raises(RuntimeError, match="head dim"):
        attn(*c.args(), causal=False)


def test_mixed_devices_rejected(backend):
    cuda_only(backend, "a second device")
    c = make_case(Lq=3, Lmax=10, Hq=2, Hkv=1, D=16, q_start=[0], q_len=[3], kv_len=[5], device="cuda")
    with pytest.raises(ValueError, match="^k_cache:"):
        ops.window_attention(c.q, c.k_cache.cpu(), c.v_cache, c.q_start, c.q_len, c.kv_len, causal=False)
    with pytest.raises(RuntimeError, match="window_attention"):
        torch.ops.apd.window_attention(c.q, c.k_cache, c.v_cache, c.q_start.cpu(), c.q_len, c.kv_len, False, 0.25)


@pytest.mark.parametrize("impl", IMPLS)
def test_bad_lengths_never_read_out_of_bounds(use, impl):
    """The CUDA op does not read lengths on the host (no sync); the kernels clamp
    them, so out-of-range values give garbage but no fault and no NaN."""
    use(impl, "0")
    c = make_case(Lq=6, Lmax=64, Hq=4, Hkv=2, D=64, q_start=[2, 0], q_len=[6, 3], kv_len=[10, 3],
                  dtype=torch.bfloat16, device=BK.dev)
    for ql, kl in (([60, 3], [10, 3]), ([6, -4], [10, 1000]), ([6, 3], [-5, 2**40])):
        q_len = torch.tensor(ql, device=BK.dev)
        kv_len = torch.tensor(kl, device=BK.dev)
        raw = (c.q, c.k_cache, c.v_cache, c.q_start, q_len, kv_len, True, 0.125)
        if BK.name == "cuda":
            out = torch.ops.apd.window_attention(*raw)
            torch.cuda.synchronize()
        else:
            out = torch.ops.apd_emu.window_attention(*raw, impl, 0)
        assert torch.isfinite(out.float()).all()


# (B, q_len, kv_len, Hq, Hkv, D, splits): the bench_attention.py shapes. The
# mma planner packs G = Hq / Hkv heads into 128-row q tiles; when a request's
# own (kv head, q tile) grid is below one CTA per SM, it splits that request's
# keys so that its grid alone fills the 2 CTAs per SM of 132 SMs in one wave
# (rounded down), each split >= 128 keys (two key tiles). Per request
# (apd/attention_split.h): B does not change it.
PLAN_SHAPES = [
    (1, 16, 4096, 28, 4, 128, 32),    # 4 CTAs: 66 wanted, 32 by length
    (1, 100, 4096, 28, 4, 128, 11),   # 24 CTAs: 264 / 24 = 11
    (1, 116, 4096, 28, 4, 128, 8),    # 28 CTAs: 9 wanted, 8 splits of 8 key tiles (224); rounding up: 10 (280)
    (1, 216, 4096, 28, 4, 128, 5),    # 48 CTAs: 5 (240); rounding up gave 6 (288)
    (1, 216, 16384, 28, 4, 128, 5),
    (8, 100, 4096, 28, 4, 128, 11),   # as alone: batch-mates never change a request's split (the batch-wide
                                      # rule took 1 here: 192 CTAs >= 132 SMs)
    (1, 1000, 4096, 28, 4, 128, 1),   # 55 q tiles x 4 = 220 CTAs >= 132 SMs: no split
    (1, 100, 1024, 14, 2, 64, 8),     # Qwen: 12 CTAs: 22 wanted, 8 by length
]


@pytest.mark.parametrize("B,Lq,kv,Hq,Hkv,D,want", PLAN_SHAPES)
def test_mma_plan_fills_one_wave(B, Lq, kv, Hq, Hkv, D, want, backend):
    """The split count the CUDA kernels give a request of these lengths on the
    H100 profile (the planner is host code; it reads the SM count through the
    emulated cudaDeviceGetAttribute: the profile's 132)."""
    if backend != "emu":
        not_applicable("the plan is read through the emulator's torch.ops.apd_emu.window_attention_plan")
    emu = torch.ops.apd_emu
    name, cc, optin, per_sm, sms, regs = emu.device_profile(emu.get_device())
    assert name == "H100" and sms == 132, (name, sms)
    q = torch.zeros(B, Lq, Hq, D, dtype=torch.bfloat16)
    k = torch.zeros(B, kv, Hkv, D, dtype=torch.bfloat16)
    impl, splits, block_m, smem = emu.window_attention_plan(q, k, torch.full((B,), kv), "mma", 0)
    ctas = Hkv * -(-Lq * (Hq // Hkv) // 128)  # the request's own grid
    assert impl == "mma" and block_m == 128 and splits == want, (impl, block_m, splits, want)
    assert splits == 1 or (ctas * splits <= 2 * sms and -(-kv // 128) >= splits), (ctas, splits)


# Every head dim bucket of both kernels, short and long caches, MHA and GQA.
PROFILE_PLAN_SHAPES = [(B, Lq, kv, Hq, Hkv, D) for D in (8, 40, 64, 72, 128, 200, 256)
                       for (B, Lq, kv, Hq, Hkv) in ((1, 16, 4096, 28, 4), (1, 216, 1000, 28, 4), (3, 7, 300, 4, 4))]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=_dtype_id)
@pytest.mark.parametrize("impl", IMPLS)
def test_plan_fits_the_profile(impl, dtype, backend):
    """On every device profile, every plan's dynamic shared memory fits the
    profile's opt-in limit, and a request's split fills at most one wave of
    the CTAs that fit an SM with that request's own CTAs. The tiles: on sm_86 / sm_89 (99 KB opt-in) the mma kernel
    at D = 128 takes 64-row q tiles (87,056 B; 128 rows need 104,464 B) and the
    simple kernel at D > 128 4 rows per warp (98,432 B; 8 need 131,200 B);
    elsewhere the large tiles."""
    if backend != "emu":
        not_applicable("the plan is read through the emulator's torch.ops.apd_emu.window_attention_plan")
    emu = torch.ops.apd_emu
    name, cc, optin, per_sm, sms, regs = emu.device_profile(emu.get_device())
    small = optin < 104464
    seen = set()
    for B, Lq, kv, Hq, Hkv, D in PROFILE_PLAN_SHAPES:
        q = torch.zeros(B, Lq, Hq, D, dtype=dtype)
        k = torch.zeros(B, kv, Hkv, D, dtype=dtype)
        got, splits, block_m, smem = emu.window_attention_plan(q, k, torch.full((B,), kv), impl, 0)
        what = (name, impl, B, Lq, kv, Hq, Hkv, D, got, splits, block_m, smem)
        assert 0 < smem <= optin, what
        mma = impl == "mma" and dtype != torch.float32 and D in (64, 128)
        assert got == ("mma" if mma else "simple"), what
        if mma:
            assert block_m == (64 if small and D == 128 else 128), what
        else:
            assert block_m == (32 if small and D > 128 else 64), what
        ctas = Hkv * -(-Lq * (Hq // Hkv) // block_m)  # one request's
        assert splits == 1 or ctas * splits <= 2 * sms, what
        seen.add((got, block_m))
    if small:
        assert ("simple", 32) in seen and (impl == "simple" or dtype == torch.float32 or ("mma", 64) in seen), seen


@pytest.mark.parametrize("impl", IMPLS)
def test_sm86_plans_fit_and_run(use, impl, backend):
    """The A5000 profile (sm_86, 101,376 B opt-in, 64 SMs): at D = 128 and D =
    256 the planner picks a tile that fits, and the launch (checked by the
    harness against the opt-in limit) gives the reference's answer."""
    if backend != "emu":
        not_applicable("runs on the emulator's A5000 profile")
    emu = torch.ops.apd_emu
    if emu.get_device() != 0:
        not_applicable("selects the A5000 profile itself: runs once, from the default profile's param")
    emu.set_device(emu_backend.PROFILES.index("A5000"))  # restored by the backend fixture
    assert emu.device_profile(emu.get_device())[:3] == ("A5000", 86, 101376)
    use(impl, "0")
    for D, want in ((128, ("mma", 64) if impl == "mma" else ("simple", 64)), (256, ("simple", 32))):
        c = make_case(Lq=13, Lmax=150, Hq=4, Hkv=2, D=D, q_start=[120, 0], q_len=[13, 9], kv_len=[133, 40],
                      dtype=torch.bfloat16, seed=D)
        got = emu.window_attention_plan(c.q, c.k_cache, c.kv_len, impl, 0)
        assert got[0] == want[0] and got[2] == want[1] and got[3] <= 101376, (D, got)
        for causal in (False, True):
            out = _run(c, causal)
            assert_attention_close(out, *c.args(), causal=causal, what=f"A5000 D={D} causal={causal}")


@pytest.mark.parametrize("splits", ["1", "3"], ids=["nosplit", "split3"])
@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("impl", IMPLS)
def test_nan_propagates(use, impl, causal, dtype, splits, backend):
    """DESIGN §5 / docs/SEMANTICS.md: NaN in q, in a visible key, in a visible
    value: the whole row is NaN; NaN in keys and values no row sees: output
    bit for bit unchanged. D = 128, so mma takes bf16 / fp16 (with 64-row
    tiles on sm_86 / sm_89); the causal case puts the NaN value on the
    diagonal tile (seen from row 10 on)."""
    emu_quick(backend, dtype == torch.bfloat16, profile_keep=dtype == torch.bfloat16 and causal and splits == "3")
    use(impl, splits)
    c = make_case(dtype=dtype, device=BK.dev, seed=7, D=128, **NAN_CASE)
    clean = _run(c, causal)
    assert_attention_close(clean, *c.args(), causal=causal)
    counts = {}
    for what, cn in nan_injections(c, causal):
        counts[what] = assert_nan_rule(_run(cn, causal), clean, cn, causal=causal, what=what)
    assert counts == {"q": 1, "visible_key": 2 * 21, "visible_value": 2 * (11 if causal else 21),
                      "invisible_key": 0}, counts


# --------------------------------------------------------------------------- batch invariance
#
# DESIGN.md §8 on the CUDA kernels (docs/SEMANTICS.md "Batch invariance"): a
# request's rows are bit for bit the same alone and inside any batch. Each
# request below is (q_len, kv_len, q_start) with its own q / K / V; a batch
# pads the windows to its longest (Lq) and the caches to its longest kv_len
# plus slack (Lmax), and fills the padding with finite noise that no row may
# see. TRACKED are the requests checked; MATES change the padded shapes and
# the grid around them: a longer window (more q tiles: on main fewer splits),
# a longer cache (on main more splits for every row), empty and one-row
# windows, and short caches that never split.
INV_HEADS = dict(Hq=4, Hkv=2, D=64)  # GQA 2; D = 64: the mma kernel applies in bf16 / fp16
INV_TRACKED = {
    "short_kv": (5, 300, 295),    # a few key tiles: split alone into short chunks
    "long_kv": (3, 1000, 997),    # long cache: many splits (128-key minimum)
    "window": (37, 700, 0),       # a window at position 0 under a longer cache (2 simple q tiles)
}
INV_MATES = [
    (64, 1200, 1136),  # long window and the longest cache
    (1, 64, 63),       # one row, one key tile
    (0, 10, 0),        # empty window
    (17, 520, 503),
    (150, 400, 250),   # longest window: 300 packed rows, 3 mma q tiles / 5 simple ones
]
# Batches: the tracked request's index, and the mates around it (indices into
# INV_MATES); B = 1 .. 6, the request first, in the middle and last.
INV_BATCHES = [
    (0, []),
    (0, [0]),
    (1, [1, 3]),
    (2, [4, 2]),
    (1, [0, 1, 2, 3]),
    (5, [4, 0, 3, 1, 2]),
]


def _inv_request(spec, dtype, seed):
    q_len, kv_len, q_start = spec
    g = torch.Generator().manual_seed(seed)
    Hq, Hkv, D = INV_HEADS["Hq"], INV_HEADS["Hkv"], INV_HEADS["D"]
    return (torch.randn(q_len, Hq, D, generator=g).to(dtype), torch.randn(kv_len, Hkv, D, generator=g).to(dtype),
            torch.randn(kv_len, Hkv, D, generator=g).to(dtype))


def _inv_batch(reqs, dtype, seed, slack):
    """reqs: [(spec, (q, k, v))] -> the window_attention arguments of one batch on BK.dev."""
    g = torch.Generator().manual_seed(seed)
    Hq, Hkv, D = INV_HEADS["Hq"], INV_HEADS["Hkv"], INV_HEADS["D"]
    Lq = max(1, max(s[0] for s, _ in reqs))
    Lmax = max(s[1] for s, _ in reqs) + slack
    B = len(reqs)
    q = (torch.randn(B, Lq, Hq, D, generator=g) * 5).to(dtype)  # noise where no row may look
    k = (torch.randn(B, Lmax, Hkv, D, generator=g) * 5).to(dtype)
    v = (torch.randn(B, Lmax, Hkv, D, generator=g) * 5).to(dtype)
    for b, ((q_len, kv_len, _), (qr, kr, vr)) in enumerate(reqs):
        q[b, :q_len], k[b, :kv_len], v[b, :kv_len] = qr, kr, vr
    ints = lambda i: torch.tensor([s[i] for s, _ in reqs], device=BK.dev)  # noqa: E731
    return tuple(t.to(BK.dev) for t in (q, k, v)) + (ints(2), ints(0), ints(1))


@pytest.mark.parametrize("splits", ["0", "3"], ids=["auto", "split3"])
@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("impl", IMPLS)
def test_batch_invariance(use, impl, causal, dtype, splits, backend):
    """A request's output rows are bit-identical alone (B = 1, Lq = its q_len,
    Lmax = its kv_len) and inside every batch of INV_BATCHES (other requests
    around it, longer / shorter windows and caches, a bigger cache allocation),
    for the split heuristic and a requested split count: every choice that
    touches a row's arithmetic (kernel, q tile, key tile, split count and
    boundaries, combine order) comes from the device profile, the dtype /
    head shapes and that request's own lengths (attention_launch.h). Its
    padding rows are zeros. All three emulator schedules agree on each call."""
    if impl == "mma" and dtype == torch.float32:
        not_applicable("the mma kernel does not apply to fp32: the simple kernel would run again")
    emu_quick(backend, dtype == torch.bfloat16 and splits == "0",
              profile_keep=dtype == torch.bfloat16 and splits == "0" and not causal)
    use(impl, splits)
    mates = [(spec, _inv_request(spec, dtype, 100 + i)) for i, spec in enumerate(INV_MATES)]
    for ti, (name, spec) in enumerate(INV_TRACKED.items()):
        req = (spec, _inv_request(spec, dtype, ti))
        q_len = spec[0]
        alone_args = _inv_batch([req], dtype, seed=ti, slack=0)
        alone = _run_args(alone_args, causal)[0, :q_len]
        assert torch.isfinite(alone.float()).all(), name
        if backend == "emu":  # the request really splits (the plan op reports sequence 0's own split)
            n = torch.ops.apd_emu.window_attention_plan(alone_args[0], alone_args[1], alone_args[5], impl,
                                                        int(splits))[1]
            assert n > 1, (name, n)
        for bi, (pos, idx) in enumerate(INV_BATCHES[1:]):
            reqs = [mates[i] for i in idx]
            reqs.insert(pos, req)
            out = _run_args(_inv_batch(reqs, dtype, seed=1000 + bi, slack=37 * bi), causal)
            got = out[pos]
            same = got[:q_len] == alone
            assert same.all(), (f"{name} in batch {bi} (B={len(reqs)}, at {pos}): "
                                f"{int((~same).sum())} of {same.numel()} values differ from alone, "
                                f"max |diff| {(got[:q_len].double() - alone.double()).abs().max().item():.3g}")
            assert torch.all(got[q_len:] == 0), (name, bi)


def _run_args(args, causal):
    out = attn(*args, causal=causal)
    if BK.name == "cuda":
        torch.cuda.synchronize()
    return out
