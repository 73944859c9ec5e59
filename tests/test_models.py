"""The Qwen2 / Dream runtime (python/apd_ext/models) against transformers'
Qwen2 on tiny random checkpoints written by tests/model_utils.py."""
import json
import os

import pytest
import torch

import apd_ext
from apd_ext.models import BucketedGraphs, KVCache, check_compatible, random_model
from apd_ext.models.config import parse_config
from tests.model_utils import bidirectional_mask, hf_logits, make_tiny_dream, make_tiny_qwen2, make_tiny_qwen3

V = 509
ATOL = {torch.float32: 2e-5}


def i64(*xs):
    return torch.tensor(xs, dtype=torch.int64)


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    pytest.importorskip("transformers")
    path = tmp_path_factory.mktemp("qwen2")
    return path, make_tiny_qwen2(path)


@pytest.fixture(scope="module")
def dream(tmp_path_factory):
    pytest.importorskip("transformers")
    path = tmp_path_factory.mktemp("dream")
    return path, make_tiny_dream(path, seed=1)


def ids_batch(B, L, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (B, L), generator=g)


# --------------------------------------------------------------------- parity
def test_ar_full_sequence_matches_transformers(qwen):
    path, hf = qwen
    model = apd_ext.load_model(path)
    assert model.kind == "ar" and model.path == os.fspath(path) and model.config.mask_token_id is None
    ids = ids_batch(3, 13)
    lens = i64(13, 7, 1)  # ragged: rows past q_len are padding
    cache = model.new_cache(3, 40)
    out = model.forward(ids, cache, i64(0, 0, 0), lens)
    assert out.shape == (3, 13, V) and out.dtype == torch.float32
    for b in range(3):
        n = int(lens[b])
        ref = hf_logits(hf, ids[b : b + 1, :n])[0]
        torch.testing.assert_close(out[b, :n], ref, atol=ATOL[torch.float32], rtol=1e-5)
    assert cache.lengths.tolist() == lens.tolist()


def test_ar_incremental_with_cache_matches_full(qwen):
    path, hf = qwen
    model = apd_ext.load_model(path)
    ids = ids_batch(2, 17, seed=1)
    ref = hf_logits(hf, ids)
    cache = model.new_cache(2, 24)
    got, t = [], 0
    for n in (6, 1, 4, 2, 4):  # prefill, then decode steps and drafts of various sizes
        got.append(model.forward(ids[:, t : t + n], cache, i64(t, t), i64(n, n)))
        t += n
        assert cache.lengths.tolist() == [t, t]
    torch.testing.assert_close(torch.cat(got, 1), ref, atol=ATOL[torch.float32], rtol=1e-5)


def test_ar_ragged_positions_per_sequence(qwen):
    # Two sequences at different positions in one batched forward.
    path, hf = qwen
    model = apd_ext.load_model(path)
    ids = ids_batch(2, 15, seed=2)
    cache = model.new_cache(2, 20)
    model.forward(ids[:, :8], cache, i64(0, 0), i64(8, 5))
    win = torch.stack([ids[0, 8:12], torch.cat([ids[1, 5:8], ids[1, :1]])])  # seq 1 has 3 real rows
    out = model.forward(win, cache, i64(8, 5), i64(4, 3))
    torch.testing.assert_close(out[0], hf_logits(hf, ids[:1, :12])[0, 8:12], atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(out[1, :3], hf_logits(hf, ids[1:, :8])[0, 5:8], atol=2e-5, rtol=1e-5)
    assert cache.lengths.tolist() == [12, 8]


def test_dllm_matches_bidirectional_transformers(dream):
    path, hf = dream
    model = apd_ext.load_model(path)
    assert model.kind == "dllm" and model.config.mask_token_id == 508
    ids = ids_batch(2, 12, seed=3)
    ids[:, 7:] = 508  # masked tail, as Dream sees it
    ref = hf_logits(hf, ids, bidirectional=True)
    out = model.forward(ids, model.new_cache(2, 16), i64(0, 0), i64(12, 12))
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-5)
    # Causal and bidirectional really differ (the mask reached the model) ...
    assert (hf_logits(hf, ids) - ref).abs().max() > 1e-2
    # ... and a later token changes an earlier row, for transformers and for us.
    ids2 = ids.clone()
    ids2[:, 10] = 3
    ref2 = hf_logits(hf, ids2, bidirectional=True)
    out2 = model.forward(ids2, model.new_cache(2, 16), i64(0, 0), i64(12, 12))
    assert (ref2[:, 0] - ref[:, 0]).abs().max() > 1e-3
    torch.testing.assert_close(out2, ref2, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["ar", "dllm"])
def test_kernel_path_equals_reference_path(qwen, dream, monkeypatch, kind):
    from apd_ext.models import qwen2

    model = apd_ext.load_model((qwen if kind == "ar" else dream)[0])
    ids = ids_batch(2, 10, seed=17)
    run = lambda: model.forward(ids, model.new_cache(2, 12), i64(2, 0), i64(7, 10))  # noqa: E731
    fast = run()
    monkeypatch.setattr(qwen2, "_ATTENTION", "reference")  # the fp64 oracle inside the same forward
    torch.testing.assert_close(fast, run(), atol=1e-5, rtol=1e-5)


def test_dllm_shifted_logit_rows(dream):
    # Dream scores position i from row i - 1: positions t .. right-1 need rows
    # t-1 .. right-2, which logit_rows returns without running the head elsewhere.
    path, hf = dream
    model = apd_ext.load_model(path)
    ids = ids_batch(2, 12, seed=4)
    full = hf_logits(hf, ids, bidirectional=True)
    t = i64(5, 3)
    out = model.forward(ids, model.new_cache(2, 12), i64(0, 0), i64(12, 12), logit_rows=(t - 1, 6))
    assert out.shape == (2, 6, V)
    for b in range(2):
        s = int(t[b]) - 1
        torch.testing.assert_close(out[b], full[b, s : s + 6], atol=2e-5, rtol=1e-5)


def test_dllm_window_recompute_equals_full(dream):
    # A cache holding [0, left) from the same tokens + a forward over [left, right)
    # equals one full forward over [0, right) on the window rows.
    path, _ = dream
    model = apd_ext.load_model(path)
    ids = ids_batch(2, 20, seed=5)
    full = model.forward(ids, model.new_cache(2, 24), i64(0, 0), i64(20, 20))
    cache = model.new_cache(2, 24)
    model.forward(ids, cache, i64(0, 0), i64(20, 20))  # fills [0, 20), exactly as a first step would
    left = i64(7, 12)
    win = torch.stack([ids[0, 7:20], torch.cat([ids[1, 12:20], ids[1, :5]])])
    out = model.forward(win, cache, left, i64(13, 8))
    torch.testing.assert_close(out[0], full[0, 7:20], atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(out[1, :8], full[1, 12:20], atol=2e-5, rtol=1e-5)


def test_rollback_equals_never_going_ahead(qwen):
    path, _ = qwen
    model = apd_ext.load_model(path)
    ids = ids_batch(2, 16, seed=6)
    junk = ids_batch(2, 5, seed=7)
    # Never going ahead: prompt [0, 8), accepted [8, 10), next draft [10, 14).
    clean = model.new_cache(2, 20)
    model.forward(ids[:, :8], clean, i64(0, 0), i64(8, 8))
    model.forward(ids[:, 8:10], clean, i64(8, 8), i64(2, 2))
    want = model.forward(ids[:, 10:14], clean, i64(10, 10), i64(4, 4))
    # Going ahead: a 5-token draft of which 2 are accepted (seq 0) and 0 (seq 1).
    cache = model.new_cache(2, 20)
    model.forward(ids[:, :8], cache, i64(0, 0), i64(8, 8))
    ahead = torch.cat([ids[:, 8:10], junk[:, :3]], 1)
    ahead[1, 0] = junk[1, 4]
    model.forward(ahead, cache, i64(8, 8), i64(5, 5))
    cache.crop(0, 10)
    cache.crop_(i64(20, 8))  # min semantics: seq 0 stays at 10, seq 1 back to 8
    assert cache.lengths.tolist() == [10, 8]
    model.forward(ids[1:, 8:10].expand(2, 2).clone(), cache, i64(10, 8), i64(0, 2))  # seq 1 re-decodes
    assert cache.lengths.tolist() == [10, 10]
    got = model.forward(ids[:, 10:14], cache, i64(10, 10), i64(4, 4))
    # Rounding only: on the CPU the re-decode's 2 valid rows run packed (a
    # 2-row GEMM, not the 4-row one that wrote `clean`), ~1 ulp apart; a stale
    # K/V of the junk draft would be off by orders of magnitude more.
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    cache.reset()
    assert cache.lengths.tolist() == [0, 0]


def test_padding_rows_leave_the_cache_alone(qwen):
    path, _ = qwen
    model = apd_ext.load_model(path)
    cache = model.new_cache(2, 10)
    ids = ids_batch(2, 10, seed=8)
    model.forward(ids, cache, i64(0, 0), i64(10, 10))
    k0, v0 = cache.k.clone(), cache.v.clone()
    # Seq 0 rewrites [4, 6) with the same tokens; its padding rows would land on
    # [6, 10) and past max_len. Seq 1 is all padding (q_len 0).
    win = torch.cat([ids[:, 4:6], ids_batch(2, 7, seed=9)], 1)
    model.forward(win, cache, i64(4, 3), i64(2, 0))
    assert cache.lengths.tolist() == [6, 3]
    # Rounding only on the rewritten [4, 6): a 2-row GEMM (packed) against the
    # 20-row one that wrote k0; MKL's kernel for each shape depends on the CPU,
    # and one such machine was 1.01e-6 (~4 ulp at 0.25) off. A padding row
    # landing on a valid position would be off by O(1); untouched rows are
    # compared exactly below.
    torch.testing.assert_close(cache.k, k0, atol=1e-5, rtol=0)
    torch.testing.assert_close(cache.v, v0, atol=1e-5, rtol=0)
    assert torch.equal(cache.k[:, 0, 6:], k0[:, 0, 6:]) and torch.equal(cache.k[:, 1], k0[:, 1])


# -------------------------------------------------------------------- loading
def test_sharded_checkpoint_loads_like_single_file(qwen, tmp_path):
    path, hf = qwen
    make_tiny_qwen2(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert not (tmp_path / "model.safetensors").exists()
    a, b = apd_ext.load_model(path), apd_ext.load_model(tmp_path)
    ids = ids_batch(1, 9, seed=10)
    la = a.forward(ids, a.new_cache(1, 9), i64(0), i64(9))
    lb = b.forward(ids, b.new_cache(1, 9), i64(0), i64(9))
    assert torch.equal(la, lb)


def test_tied_bf16_checkpoint_loads_as_fp32(tmp_path):
    # Tied head (no lm_head.weight in the file) stored in bf16, loaded as fp32:
    # the logits are those of the bf16 weights computed in fp32.
    from safetensors import safe_open

    hf = make_tiny_qwen2(tmp_path / "src", tie=True, seed=4).to(torch.bfloat16)
    hf.save_pretrained(tmp_path / "bf16")
    with safe_open(str(tmp_path / "bf16" / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in f.keys() and f.get_tensor("model.norm.weight").dtype == torch.bfloat16
    assert json.load(open(tmp_path / "bf16" / "config.json"))["dtype"] == "bfloat16"
    assert apd_ext.load_model(tmp_path / "bf16").dtype == torch.bfloat16  # the checkpoint's dtype by default
    model = apd_ext.load_model(tmp_path / "bf16", dtype=torch.float32)  # an explicit dtype wins
    assert model.dtype == torch.float32 and model.lm_head is model.embed
    ids = ids_batch(2, 9, seed=16)
    out = model.forward(ids, model.new_cache(2, 9), i64(0, 0), i64(9, 9))
    from transformers import Qwen2ForCausalLM

    # (Not hf.float(): .to(bf16) also rounded transformers' RoPE inv_freq buffer.)
    ref = Qwen2ForCausalLM.from_pretrained(tmp_path / "bf16", dtype=torch.float32, attn_implementation="eager")
    assert ref.model.norm.weight.dtype == torch.float32
    torch.testing.assert_close(out, hf_logits(ref.eval(), ids), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype,atol", [(torch.bfloat16, 0.08), (torch.float16, 0.012)])  # logits ~N(0, 0.7)
def test_dtype_conversion(qwen, dtype, atol):
    path, hf = qwen
    model = apd_ext.load_model(path, dtype=dtype)
    assert model.dtype == dtype and model.layers[0].w_qkv.dtype == dtype
    ids = ids_batch(2, 10, seed=11)
    cache = model.new_cache(2, 12)
    assert cache.k.dtype == dtype
    out = model.forward(ids, cache, i64(0, 0), i64(10, 10))
    assert out.dtype == dtype
    hf_low = make_tiny_qwen2(path.parent / f"low_{dtype}".replace(".", "_")).to(dtype)
    ref = hf_logits(hf_low, ids)
    torch.testing.assert_close(out.float(), ref.float(), atol=atol, rtol=0)
    assert (out.float() - hf_logits(hf, ids)).abs().max() < atol  # no further from fp32 than transformers


@pytest.mark.parametrize("tie", [False, True])
def test_live_model_handoff_shares_tensors(tmp_path, tie):
    hf = make_tiny_qwen2(tmp_path, tie=tie, seed=3)
    model = apd_ext.load_model(hf)
    assert model.kind == "ar" and model.path is None and model.config.tie_word_embeddings == tie
    assert model.embed.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
    assert model.lm_head.data_ptr() == hf.lm_head.weight.data_ptr()
    l0, h0 = model.layers[1], hf.model.layers[1]
    assert l0.w_o.data_ptr() == h0.self_attn.o_proj.weight.data_ptr()
    assert l0.w_down.data_ptr() == h0.mlp.down_proj.weight.data_ptr()
    assert l0.w_gate.data_ptr() == h0.mlp.gate_proj.weight.data_ptr() and l0.w_gate_up is None  # not fused: shared
    assert l0.ln_attn.data_ptr() == h0.input_layernorm.weight.data_ptr()
    ids = ids_batch(2, 9, seed=12)
    out = model.forward(ids, model.new_cache(2, 9), i64(0, 0), i64(9, 9))
    torch.testing.assert_close(out, hf_logits(hf, ids), atol=2e-5, rtol=1e-5)
    # The same live weights flagged as a dLLM run bidirectionally.
    dl = apd_ext.load_model(hf, kind="dllm", mask_token_id=508)
    assert dl.kind == "dllm" and dl.config.mask_token_id == 508
    out = dl.forward(ids, dl.new_cache(2, 9), i64(0, 0), i64(9, 9))
    torch.testing.assert_close(out, hf_logits(hf, ids, bidirectional=True), atol=2e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="mask_token_id"):
        apd_ext.load_model(hf, kind="dllm")
    # An explicit dtype converts (a copy).
    assert apd_ext.load_model(hf, dtype=torch.bfloat16).embed.dtype == torch.bfloat16


def test_generation_config_supplies_ids(tmp_path):
    make_tiny_dream(tmp_path, mask_token_id=None)
    with open(tmp_path / "generation_config.json", "w") as f:
        json.dump({"mask_token_id": 507, "eos_token_id": [2, 5], "pad_token_id": 4}, f)
    c = apd_ext.load_model(tmp_path).config
    assert (c.mask_token_id, c.eos_token_ids, c.pad_token_id, c.bos_token_id) == (507, [2, 5], 4, 1)


def test_real_dream_and_qwen25_configs_parse():
    dream = {
        "architectures": ["DreamModel"], "model_type": "Dream", "hidden_act": "silu", "hidden_size": 3584,
        "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
        "num_key_value_heads": 4, "vocab_size": 152064, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6,
        "max_position_embeddings": 131072, "mask_token_id": 151666, "bos_token_id": 151643,
        "eos_token_id": 151643, "pad_token_id": 151643, "tie_word_embeddings": False, "rope_scaling": None,
        "sliding_window": None, "use_sliding_window": False,
    }
    kind, c = parse_config(dream)
    assert kind == "dllm" and c.head_dim == 128 and c.mask_token_id == 151666 and c.eos_token_ids == [151643]
    qwen = {
        "model_type": "qwen2", "hidden_act": "silu", "hidden_size": 896, "intermediate_size": 4864,
        "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2, "vocab_size": 151936,
        "rope_theta": 1000000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": True, "bos_token_id": 151643,
        "eos_token_id": 151645, "sliding_window": 32768, "use_sliding_window": False,
    }
    kind, c = parse_config(qwen, {"eos_token_id": [151645, 151643], "pad_token_id": 151643})
    assert kind == "ar" and c.head_dim == 64 and c.eos_token_ids == [151645, 151643] and c.mask_token_id is None


# ------------------------------------------------------------------- Qwen3
@pytest.fixture(scope="module", params=[(False, 24), (True, 16)], ids=["untied-hd24", "tied-hd16"])
def qwen3(tmp_path_factory, request):
    """Qwen3 folders written by transformers' Qwen3ForCausalLM: head_dim 24 != 64 / 4
    with untied embeddings, and head_dim 16 == 64 / 4 with tied embeddings."""
    pytest.importorskip("transformers")
    tie, head_dim = request.param
    path = tmp_path_factory.mktemp("qwen3")
    return path, make_tiny_qwen3(path, tie=tie, head_dim=head_dim, seed=4)


def test_qwen3_full_sequence_matches_transformers(qwen3):
    path, hf = qwen3
    model = apd_ext.load_model(path)
    c = model.config
    assert model.kind == "ar" and c.qk_norm and not c.qkv_bias and c.head_dim == hf.config.head_dim
    assert c.tie_word_embeddings == hf.config.tie_word_embeddings
    ids = ids_batch(3, 13, seed=7)
    lens = i64(13, 9, 2)
    out = model.forward(ids, model.new_cache(3, 20), i64(0, 0, 0), lens)
    for b in range(3):
        n = int(lens[b])
        torch.testing.assert_close(out[b, :n], hf_logits(hf, ids[b : b + 1, :n])[0], atol=2e-5, rtol=1e-5)


def test_qwen3_cached_steps_match_transformers(qwen3):
    # Prompt then one-token and three-token steps through the cache, as the verifier runs.
    path, hf = qwen3
    model = apd_ext.load_model(path)
    ids = ids_batch(2, 14, seed=8)
    full = hf_logits(hf, ids)
    cache = model.new_cache(2, 16)
    model.forward(ids[:, :8], cache, i64(0, 0), i64(8, 8))
    out = model.forward(ids[:, 8:9], cache, i64(8, 8), i64(1, 1))
    torch.testing.assert_close(out[:, 0], full[:, 8], atol=2e-5, rtol=1e-5)
    out = model.forward(ids[:, 9:12], cache, i64(9, 9), i64(3, 3))
    torch.testing.assert_close(out, full[:, 9:12], atol=2e-5, rtol=1e-5)


def test_qwen3_as_dllm_windowed_matches_bidirectional_transformers(qwen3):
    # The same Qwen3 layout run bidirectionally (a live model flagged kind="dllm"):
    # a full forward equals transformers with an all-visible mask, and a window
    # over [left, 20) on a cache of the same tokens equals the full forward's rows.
    _, hf = qwen3
    model = apd_ext.load_model(hf, kind="dllm", mask_token_id=508)
    assert model.kind == "dllm" and model.config.qk_norm
    ids = ids_batch(2, 20, seed=9)
    ids[:, 15:] = 508
    full = model.forward(ids, model.new_cache(2, 24), i64(0, 0), i64(20, 20))
    torch.testing.assert_close(full, hf_logits(hf, ids, bidirectional=True), atol=2e-5, rtol=1e-5)
    cache = model.new_cache(2, 24)
    model.forward(ids, cache, i64(0, 0), i64(20, 20))
    win = torch.stack([ids[0, 6:20], torch.cat([ids[1, 11:20], ids[1, :5]])])
    out = model.forward(win, cache, i64(6, 11), i64(14, 9))
    torch.testing.assert_close(out[0], full[0, 6:20], atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(out[1, :9], full[1, 11:20], atol=2e-5, rtol=1e-5)


def test_qwen3_fields_the_runtime_would_ignore_are_refused(tmp_path):
    pytest.importorskip("transformers")
    make_tiny_qwen3(tmp_path)
    with open(tmp_path / "config.json") as f:
        good = json.load(f)
    for change, name in (
        ({"attention_bias": True}, "attention_bias"),
        ({"layer_types": ["full_attention", "sliding_attention"]}, "sliding_attention"),
        ({"use_sliding_window": True}, "use_sliding_window"),
        ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0}}, "yarn"),
    ):
        with pytest.raises(ValueError, match=name):
            parse_config({**good, **change})
    kind, c = parse_config(good)
    assert kind == "ar" and c.qk_norm and c.head_dim == 24


# Dream family config.json dicts, field by field. The three checkpoints
# (apple/DiffuCoder-7B-Instruct, Dream-org/Dream-Coder-v0-Instruct-7B,
# d3LLM/d3LLM_Dream) are Dream's architecture converted from Qwen2.5(-Coder)-7B:
# the architecture fields are Dream-v0-Instruct-7B's config.json (as in the test
# above); the special ids are those a public third-party registry of these
# checkpoints records (mask 151666, eos / pad 151643, Dream-Coder's bos 151665;
# DiffuCoder's tokenizer pad <|dlm_pad|> is not a config field). The published
# config.json files themselves could not be read from this machine: re-check
# the fields against them when the folders are at hand (`apd check-pair` too).
_DREAM_7B_LAYOUT = {
    "architectures": ["DreamModel"], "model_type": "Dream", "attention_dropout": 0.0, "hidden_act": "silu",
    "hidden_size": 3584, "initializer_range": 0.02, "intermediate_size": 18944, "max_window_layers": 28,
    "num_attention_heads": 28, "num_hidden_layers": 28, "num_key_value_heads": 4, "rms_norm_eps": 1e-6,
    "rope_scaling": None, "rope_theta": 1000000.0, "sliding_window": None, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "use_cache": True, "use_sliding_window": False, "vocab_size": 152064,
}
DIFFUCODER_7B = {**_DREAM_7B_LAYOUT, "max_position_embeddings": 32768, "bos_token_id": 151643,
                 "eos_token_id": 151643, "pad_token_id": 151643, "mask_token_id": 151666}
DREAM_CODER_7B = {**_DREAM_7B_LAYOUT, "max_position_embeddings": 32768, "bos_token_id": 151665,
                  "eos_token_id": 151643, "pad_token_id": 151643, "mask_token_id": 151666}
D3LLM_DREAM = {**_DREAM_7B_LAYOUT, "max_position_embeddings": 131072, "bos_token_id": 151643,
               "eos_token_id": 151643, "pad_token_id": 151643, "mask_token_id": 151666}
# generation_config.json of Dream-v0-Instruct-7B (as a public mirror of it shows):
# the diffusion sampler's settings (alg, steps, eps ...) belong to the released
# sampler, not the model; APD reads only the ids from it (mask_token_id null:
# config.json's wins).
DREAM_FAMILY_GEN = {"_from_model_config": True, "alg": "origin", "alg_temp": None, "bos_token_id": 151643,
                    "eos_token_id": 151643, "eps": 0.001, "mask_token_id": None, "output_history": False,
                    "pad_token_id": 151643, "steps": 512, "temperature": 0.0, "top_k": None, "top_p": None}


@pytest.mark.parametrize("name,cfg", [("DiffuCoder-7B", DIFFUCODER_7B), ("Dream-Coder-v0-Instruct-7B", DREAM_CODER_7B),
                                      ("d3LLM-Dream", D3LLM_DREAM)])
def test_dream_family_configs_parse(name, cfg):
    kind, c = parse_config(cfg, DREAM_FAMILY_GEN, where=name)
    assert kind == "dllm" and c.mask_token_id == 151666 and c.eos_token_ids == [151643]
    assert (c.head_dim, c.num_heads, c.num_kv_heads, c.vocab_size) == (128, 28, 4, 152064)
    assert c.qkv_bias and not c.qk_norm
    # generation_config.json's ids win over config.json's (Dream-Coder's bos too)
    assert c.bos_token_id == 151643 and c.pad_token_id == 151643
    # One clear error naming each field the runtime would silently ignore.
    for change, field_name in (
        ({"rope_scaling": {"type": "yarn", "factor": 4.0}}, "rope type 'yarn'"),
        ({"use_sliding_window": True, "sliding_window": 4096}, "use_sliding_window"),
        ({"mlp_bias": True}, "mlp_bias"),
        ({"partial_rotary_factor": 0.5}, "partial_rotary_factor"),
        ({"hidden_act": "gelu"}, "hidden_act"),
    ):
        with pytest.raises(ValueError, match=f"{name}: .*{field_name}"):
            parse_config({**cfg, **change}, DREAM_FAMILY_GEN, where=name)


def _edit_config(path, **changes):
    with open(path / "config.json") as f:
        cfg = json.load(f)
    cfg.update(changes)
    with open(path / "config.json", "w") as f:
        json.dump(cfg, f)


def test_bad_checkpoints(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        apd_ext.load_model(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="config.json"):
        apd_ext.load_model(tmp_path)
    sharded = tmp_path / "sharded"
    make_tiny_qwen2(sharded, max_shard_size="40KB")
    index_path = sharded / "model.safetensors.index.json"
    index = json.load(open(index_path))
    del index["weight_map"]["model.norm.weight"]
    json.dump(index, open(index_path, "w"))
    with pytest.raises(ValueError, match="'model.norm.weight' is not in the checkpoint"):
        apd_ext.load_model(sharded)
    with pytest.raises(ValueError, match="only for a live model"):
        apd_ext.load_model(sharded, kind="dllm")
    shard = sorted(p for p in os.listdir(sharded) if p.endswith(".safetensors"))[-1]
    os.remove(sharded / shard)
    with pytest.raises(FileNotFoundError, match=shard):
        apd_ext.load_model(sharded)

    path = tmp_path / "ckpt"
    make_tiny_qwen2(path)
    _edit_config(path, model_type="llama")
    with pytest.raises(ValueError, match="model_type 'llama'"):
        apd_ext.load_model(path)
    _edit_config(path, model_type="qwen2", intermediate_size=100)
    with pytest.raises(ValueError, match=r"mlp.gate_proj.weight' has shape \[96, 64\], expected \[100, 64\]"):
        apd_ext.load_model(path)
    _edit_config(path, intermediate_size=96, num_hidden_layers=3)
    with pytest.raises(ValueError, match=r"tensor .model\.layers\.2\..* is missing"):
        apd_ext.load_model(path)
    _edit_config(path, num_hidden_layers=2, model_type="Dream")
    with pytest.raises(ValueError, match="mask_token_id"):
        apd_ext.load_model(path)
    _edit_config(path, model_type="qwen2")
    del_cfg = json.load(open(path / "config.json"))
    del del_cfg["hidden_size"]
    json.dump(del_cfg, open(path / "config.json", "w"))
    with pytest.raises(ValueError, match="hidden_size"):
        apd_ext.load_model(path)
    _edit_config(path, hidden_size=64)
    os.remove(path / "model.safetensors")
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        apd_ext.load_model(path)
    with pytest.raises(TypeError, match="src"):
        apd_ext.load_model(42)


def test_forward_argument_errors(qwen):
    path, _ = qwen
    model = apd_ext.load_model(path)
    cache = model.new_cache(2, 8)
    ids = ids_batch(2, 4)
    z, four = i64(0, 0), i64(4, 4)
    with pytest.raises(ValueError, match="input_ids"):
        model.forward(ids.int(), cache, z, four)
    with pytest.raises(ValueError, match="cache"):
        model.forward(ids, model.new_cache(3, 8), z, four)
    with pytest.raises(TypeError, match="cache"):
        model.forward(ids, None, z, four)
    with pytest.raises(ValueError, match="q_len"):
        model.forward(ids, cache, z, i64(5, 4))
    with pytest.raises(ValueError, match="q_start"):
        model.forward(ids, cache, i64(5, 0), four)
    with pytest.raises(ValueError, match=r"logit_rows\[1\]"):
        model.forward(ids, cache, z, four, logit_rows=(z, 5))
    with pytest.raises(ValueError, match=r"logit_rows\[0\]"):
        model.forward(ids, cache, z, four, logit_rows=(i64(2, 0), 3))
    with pytest.raises(ValueError, match="length"):
        cache.crop(0, -1)
    assert isinstance(cache, KVCache) and cache.k.shape == (2, 2, 8, 2, 16)


# ------------------------------------------------------------- compatibility
class _Tok:
    def __init__(self, vocab):
        self.vocab = vocab

    def get_vocab(self):
        return dict(self.vocab)


def test_check_compatible(tmp_path):
    make_tiny_dream(tmp_path / "d", vocab=509)
    make_tiny_qwen2(tmp_path / "a", vocab=500)  # smaller verifier vocab: allowed
    dl, ar = apd_ext.load_model(tmp_path / "d"), apd_ext.load_model(tmp_path / "a")
    toks = {f"t{i}": i for i in range(495)}
    tok_d = _Tok({**toks, "<mask>": 508})
    apd_ext.check_compatible(dl, ar)
    check_compatible(dl, ar, tok_d, _Tok(toks))
    with pytest.raises(ValueError, match="kind 'dllm'"):
        check_compatible(ar, ar)
    with pytest.raises(ValueError, match="kind 'ar'"):
        check_compatible(dl, dl)
    with pytest.raises(ValueError, match="tokenizer mismatch at id 7"):
        check_compatible(dl, ar, tok_d, _Tok({**toks, "t7": 9, "t9": 7}))
    with pytest.raises(ValueError, match="does not fit"):
        check_compatible(dl, ar, tok_d, _Tok({**toks, "big": 600}))
    with pytest.raises(ValueError, match="both or neither"):
        check_compatible(dl, ar, tok_d)
    make_tiny_qwen2(tmp_path / "b", bos_token_id=3)
    with pytest.raises(ValueError, match="bos_token_id"):
        check_compatible(dl, apd_ext.load_model(tmp_path / "b"))
    make_tiny_qwen2(tmp_path / "e", eos_token_id=[5, 6])
    with pytest.raises(ValueError, match="eos_token_id"):
        check_compatible(dl, apd_ext.load_model(tmp_path / "e"))
    make_tiny_qwen2(tmp_path / "s", vocab=200, eos_token_id=[2, 300])
    with pytest.raises(ValueError, match="special token id 300"):
        check_compatible(dl, apd_ext.load_model(tmp_path / "s"))


# ----------------------------------------------------------------- CUDA graphs
TINY_CONFIG = {
    "model_type": "qwen2", "vocab_size": V, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "rope_theta": 10000.0, "eos_token_id": 2,
}


def test_random_model_runs():
    model = random_model(TINY_CONFIG, seed=1)
    assert model.kind == "ar" and model.path is None
    out = model.forward(ids_batch(1, 5), model.new_cache(1, 5), i64(0), i64(5))
    assert out.shape == (1, 5, V) and torch.isfinite(out).all()


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("model_type", ["qwen2", "Dream"])
def test_cuda_graph_replay_equals_eager(dtype, model_type):
    # No transformers needed: random weights (the device may lack it).
    cfg = {**TINY_CONFIG, "model_type": model_type, "mask_token_id": 508}
    model = random_model(cfg, dtype=dtype, device="cuda", init_device="cpu")
    dev = torch.device("cuda")
    ids = ids_batch(2, 30, seed=13).to(dev)
    prompt = lambda c: model.forward(ids[:, :10], c, i64(0, 0).to(dev), i64(10, 7).to(dev))  # noqa: E731
    eager_cache, graph_cache = model.new_cache(2, 40), model.new_cache(2, 40)
    prompt(eager_cache)
    prompt(graph_cache)
    g = model.graphed(graph_cache, 8, n_rows=6)
    assert graph_cache.lengths.tolist() == [10, 7]
    for step, (qs, ql) in enumerate([((10, 7), (8, 5)), ((14, 9), (3, 8))]):
        win = ids[:, 10 + step : 18 + step].contiguous()
        qs, ql, rs = i64(*qs).to(dev), i64(*ql).to(dev), i64(1, 0).to(dev)
        want = model.forward(win, eager_cache, qs, ql, logit_rows=(rs, 6))
        got = g(win, qs, ql, rs)
        torch.cuda.synchronize()
        torch.testing.assert_close(got, want, atol=0, rtol=0)
        assert torch.equal(graph_cache.lengths, eager_cache.lengths)
        torch.testing.assert_close(graph_cache.k, eager_cache.k, atol=0, rtol=0)
    # And the eager CUDA forward matches the CPU forward of the same weights.
    cpu = random_model(cfg, dtype=torch.float32)
    full_cpu = cpu.forward(ids[:, :20].cpu(), cpu.new_cache(2, 20), i64(0, 0), i64(20, 20))
    full_gpu = model.forward(ids[:, :20], model.new_cache(2, 20), i64(0, 0).to(dev), i64(20, 20).to(dev))
    tol = 2e-4 if dtype == torch.float32 else 0.1
    assert (full_gpu.float().cpu() - full_cpu).abs().max() < tol * max(1.0, full_cpu.abs().max().item())


@pytest.mark.cuda
def test_cuda_bucketed_graphs_equal_eager():
    cfg = {**TINY_CONFIG, "model_type": "Dream", "mask_token_id": 508}
    model = random_model(cfg, dtype=torch.bfloat16, device="cuda")
    dev = torch.device("cuda")
    ids = ids_batch(2, 40, seed=15).to(dev)
    eager_cache, graph_cache = model.new_cache(2, 40), model.new_cache(2, 40)
    graphs = BucketedGraphs(model, graph_cache, buckets=(4, 8))
    for left, right in ((0, 12), (9, 14), (12, 20), (18, 21)):  # 12 > largest bucket: eager
        win = ids[:, left:right].contiguous()
        qs, ql = i64(left, left).to(dev), i64(right - left, right - left - 1).to(dev)
        rs = i64(0, 1).to(dev)
        n = max(1, right - left - 2)
        want = model.forward(win, eager_cache, qs, ql, logit_rows=(rs, n))
        got = graphs(win, qs, ql, rs, n)
        # Padded to the bucket, the GEMMs have another M: equal up to bf16 rounding.
        torch.testing.assert_close(got.float(), want.float(), atol=3e-2, rtol=2e-2)
        assert torch.equal(graph_cache.lengths, eager_cache.lengths)
    assert sorted(graphs.graphs) == [4, 8]


@pytest.mark.cuda
def test_cuda_bf16_parity_with_transformers(dream):
    path, hf = dream
    model = apd_ext.load_model(path, dtype=torch.bfloat16, device="cuda")
    ref_model = hf.to(device="cuda", dtype=torch.bfloat16)
    ids = ids_batch(2, 24, seed=14).cuda()
    out = model.forward(ids, model.new_cache(2, 24), i64(0, 0).cuda(), i64(24, 24).cuda())
    mask = {"full_attention": bidirectional_mask(2, 24, 24, torch.bfloat16)["full_attention"].cuda()}
    with torch.no_grad():
        ref = ref_model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    hf.to(device="cpu", dtype=torch.float32)
    torch.testing.assert_close(out.float(), ref.float(), atol=0.1, rtol=0)
