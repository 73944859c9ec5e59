"""transformers generate(custom_generate=...) on the embedded tiny pair: the callable
and the local-folder form give apd_ext.generate's tokens; generation_config,
stopping_criteria, attention_mask, batching, return_dict_in_generate; no weight
copies; unsupported options refused by name."""
import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import Qwen2Config, Qwen2ForCausalLM, StoppingCriteria, StoppingCriteriaList
from transformers.generation.utils import GenerateDecoderOnlyOutput

import apd_ext
from apd_ext import tiny
from apd_ext.integrations.hf import apd_generate, custom_generate_dir
from apd_ext.tasks import arith

R, W, M, MAX_NEW = 0.7, 16, 56, 40
PAD = 1  # the tiny tokenizer's <|pad|>


def _hf(folder):
    """A shipped tiny checkpoint as a live transformers Qwen2ForCausalLM (fp32)."""
    cfg = json.loads((folder / "config.json").read_text())
    c = Qwen2Config(vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"],
                    intermediate_size=cfg["intermediate_size"], num_hidden_layers=cfg["num_hidden_layers"],
                    num_attention_heads=cfg["num_attention_heads"], num_key_value_heads=cfg["num_key_value_heads"],
                    rms_norm_eps=cfg["rms_norm_eps"], max_position_embeddings=cfg["max_position_embeddings"],
                    tie_word_embeddings=cfg["tie_word_embeddings"], rope_theta=cfg["rope_theta"],
                    bos_token_id=0, eos_token_id=0, pad_token_id=PAD)
    model = Qwen2ForCausalLM(c)
    missing = model.load_state_dict({k: v.float() for k, v in load_file(str(folder / "model.safetensors")).items()},
                                    strict=False).missing_keys
    assert missing in ([], ["lm_head.weight"]) and (not missing or c.tie_word_embeddings)
    if "mask_token_id" in cfg:
        model.config.mask_token_id = cfg["mask_token_id"]
    model.generation_config.pad_token_id = PAD
    model.generation_config.eos_token_id = 0
    return model.eval()


@pytest.fixture(scope="module")
def setup():
    dllm_dir, ar_dir = tiny.paths()
    tok = tiny.tokenizer()
    probs = arith.load_jsonl(tiny.test_file())[:3]
    prompts = [tok(arith.prompt_of(p.question), add_special_tokens=False)["input_ids"] for p in probs]
    P = max(map(len, prompts))
    ids = torch.full((3, P), PAD, dtype=torch.long)  # [3, P] left padded, as transformers wants
    mask = torch.zeros((3, P), dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, P - len(p):] = torch.tensor(p)
        mask[b, P - len(p):] = 1
    assert len(set(map(len, prompts))) > 1  # really ragged
    f32 = dict(dtype=torch.float32)  # the shipped pair is stored (and by default loads) in bf16
    return dict(dllm=_hf(dllm_dir), ar=_hf(ar_dir), dllm_rt=apd_ext.load_model(str(dllm_dir), **f32),
                ar_rt=apd_ext.load_model(str(ar_dir), **f32), prompts=prompts, ids=ids, mask=mask, tok=tok)


@pytest.fixture
def engine_steps(monkeypatch):
    """A list that gets one entry per Engine.step() while the test runs (the
    class is patched, so every generate path that steps an Engine counts)."""
    from apd_ext.decoding.apd import Engine

    steps = []
    real = Engine.step

    def counting(self):
        steps.append(1)
        return real(self)

    monkeypatch.setattr(Engine, "step", counting)
    return steps


def _expected(s, max_new=MAX_NEW, cut=None, **sampling):
    """transformers' layout of apd_ext.generate's tokens: padded prompts, then each generation, pad after its end."""
    out = apd_ext.generate(s["dllm_rt"], s["ar_rt"], [torch.tensor(p) for p in s["prompts"]],
                           R=R, W=W, M=M, max_new_tokens=max_new, **sampling)
    gens = [out.generated(b).tolist() for b in range(3)]
    if cut is not None:
        gens = [cut(g) for g in gens]
    width = max(map(len, gens))
    new = torch.tensor([g + [PAD] * (width - len(g)) for g in gens])
    return torch.cat([s["ids"], new], 1)


def test_callable_batched_greedy(setup):
    s = setup
    got = s["ar"].generate(s["ids"], attention_mask=s["mask"], custom_generate=apd_generate, dllm=s["dllm"],
                           R=R, W=W, M=M, max_new_tokens=MAX_NEW, do_sample=False)
    assert torch.equal(got, _expected(s, temperature=0.0))
    # right padding (transformers warns; APD takes the mask as it is): same generated tokens
    P = s["ids"].shape[1]
    ids_r, mask_r = torch.full_like(s["ids"], PAD), torch.zeros_like(s["mask"])
    for b, p in enumerate(s["prompts"]):
        ids_r[b, : len(p)], mask_r[b, : len(p)] = torch.tensor(p), 1
    got_r = s["ar"].generate(ids_r, attention_mask=mask_r, custom_generate=apd_generate, dllm=s["dllm"],
                             R=R, W=W, M=M, max_new_tokens=MAX_NEW, do_sample=False)
    assert torch.equal(got_r[:, :P], ids_r) and torch.equal(got_r[:, P:], got[:, P:])


def test_folder_form_sampling_return_dict(setup):
    s = setup
    got = s["ar"].generate(s["ids"], attention_mask=s["mask"], custom_generate=custom_generate_dir(),
                           trust_remote_code=True, dllm=s["dllm"], R=R, W=W, M=M, max_new_tokens=MAX_NEW,
                           do_sample=True, temperature=0.5, top_p=0.9, top_k=7, seed=3,
                           return_dict_in_generate=True)
    assert isinstance(got, GenerateDecoderOnlyOutput)
    assert torch.equal(got.sequences, _expected(s, temperature=0.5, top_p=0.9, top_k=7, seed=3))


def test_stopping_criteria_and_max_new_tokens(setup):
    s = setup
    (stop_id,) = s["tok"](" =", add_special_tokens=False)["input_ids"]  # every answer has one ("13 + 7 = 20")

    class StopAt(StoppingCriteria):
        def __call__(self, input_ids, scores, **kw):
            return input_ids[:, -1] == stop_id

    got = s["ar"].generate(s["ids"], attention_mask=s["mask"], custom_generate=apd_generate, dllm=s["dllm"],
                           R=R, W=W, M=M, max_new_tokens=30, do_sample=False,
                           stopping_criteria=StoppingCriteriaList([StopAt()]))
    exp = _expected(s, max_new=30, cut=lambda g: g[: g.index(stop_id) + 1], temperature=0.0)
    assert (exp[:, s["ids"].shape[1]:] == stop_id).any(1).all()  # every row was cut
    assert torch.equal(got, exp)


def test_wraps_without_copies(setup):
    from apd_ext.integrations.hf import _runtime
    s = setup
    rt = _runtime(s["dllm"], "dllm")
    assert rt is _runtime(s["dllm"], "dllm")  # wrapped once
    assert rt.embed.data_ptr() == s["dllm"].model.embed_tokens.weight.data_ptr()
    assert rt.lm_head.data_ptr() == s["dllm"].lm_head.weight.data_ptr()
    assert rt.layers[0].w_o.data_ptr() == s["dllm"].model.layers[0].self_attn.o_proj.weight.data_ptr()


@pytest.mark.parametrize("opt, value", [("num_beams", 2), ("repetition_penalty", 1.2),
                                         ("num_return_sequences", 2), ("output_scores", True),
                                         ("forced_bos_token_id", 0), ("min_new_tokens", 3)])
def test_unsupported_options_named(setup, opt, value):
    s = setup
    with pytest.raises(ValueError, match=opt):
        s["ar"].generate(s["ids"][:1], custom_generate=apd_generate, dllm=s["dllm"], max_new_tokens=4,
                         do_sample=False, **{opt: value})


def test_extra_logits_processor_named(setup):
    from transformers import LogitsProcessorList, MinLengthLogitsProcessor
    s = setup
    with pytest.raises(ValueError, match="MinLengthLogitsProcessor"):
        s["ar"].generate(s["ids"][:1], custom_generate=apd_generate, dllm=s["dllm"], max_new_tokens=4,
                         do_sample=False, logits_processor=LogitsProcessorList([MinLengthLogitsProcessor(2, 0)]))


def test_missing_dllm(setup):
    with pytest.raises(ValueError, match="dllm"):
        setup["ar"].generate(setup["ids"][:1], custom_generate=apd_generate, max_new_tokens=4)


def test_stop_string_criteria(setup):
    """transformers' StopStringCriteria passed as stopping_criteria (generate(stop_strings=...) cannot
    reach a callable custom_generate: transformers 5.x drops its tokenizer for callables)."""
    from transformers import StopStringCriteria
    s = setup
    crit = StoppingCriteriaList([StopStringCriteria(s["tok"], ["\n"])])
    got = s["ar"].generate(s["ids"], attention_mask=s["mask"], custom_generate=apd_generate, dllm=s["dllm"],
                           R=R, W=W, M=M, max_new_tokens=30, do_sample=False, stopping_criteria=crit)
    P = s["ids"].shape[1]
    for b in range(3):
        text = s["tok"].decode([t for t in got[b, P:].tolist() if t != PAD])
        assert text.endswith("\n") and text.count("\n") == 1  # cut right after the first newline


@pytest.mark.parametrize("which", ["newline", "tokens"])
def test_stop_strings_end_generation_early(setup, which, engine_steps):
    """With stop_tokenizer=, a StopStringCriteria's strings (one or several
    tokens) go into the Engine: each row ends at the step that produces its
    stop string; the sequences equal the run without it cut as transformers
    cuts (just after the completing token), and fewer steps run.
    M=4 makes the 30-token budget take several steps; the stops are "\n" (the
    end of each row's first line) or, per row, the text of its generated
    tokens 2..4 (several tokens each), taken from a run without stops so that
    every row meets one early whatever the weights say."""
    from transformers import StopStringCriteria
    s = setup
    P = s["ids"].shape[1]
    base = dict(attention_mask=s["mask"], custom_generate=apd_generate, dllm=s["dllm"], R=R, W=W, M=4,
                max_new_tokens=30, do_sample=False)
    if which == "newline":
        stops = ["\n"]
    else:
        free = s["ar"].generate(s["ids"], **base)
        stops = [s["tok"].decode(free[b, P + 2:P + 5].tolist()) for b in range(3)]
        assert all(len(s["tok"](x, add_special_tokens=False)["input_ids"]) >= 2 for x in stops), stops
    crit = StoppingCriteriaList([StopStringCriteria(s["tok"], stops)])
    kw = dict(base, stopping_criteria=crit)
    steps = engine_steps
    with pytest.warns(UserWarning, match="stop_tokenizer"):
        cut_only = s["ar"].generate(s["ids"], **kw)
    n_cut_only = len(steps)
    steps.clear()
    early = s["ar"].generate(s["ids"], stop_tokenizer=s["tok"], **kw)
    assert torch.equal(early, cut_only)
    texts = [s["tok"].decode([t for t in early[b, P:].tolist() if t != PAD]) for b in range(3)]
    assert all(any(stop in t for stop in stops) for t in texts), (texts, stops)
    assert len(steps) < n_cut_only, (len(steps), n_cut_only)


def test_stop_strings_on_the_real_vocabulary(tmp_path, engine_steps):
    """The same on the random tiny pair at the real Qwen vocabulary: a stop
    string of several tokens from the middle of a sampled CJK / emoji text
    ends generation at the step that produces it (fewer steps than the run
    without it) and the sequence is the free run cut as transformers cuts."""
    from transformers import StopStringCriteria

    from qwen_vocab import dream_tokenizer, write_real_vocab_pair

    d, a = write_real_vocab_pair(tmp_path)
    tok = dream_tokenizer()
    eos = tok.convert_tokens_to_ids("<|endoftext|>")
    ar = Qwen2ForCausalLM.from_pretrained(a).eval()  # a transformers-written folder
    ar.generation_config.eos_token_id = ar.generation_config.pad_token_id = eos
    ids = torch.tensor([tok("你好，世界 🙂 emoji", add_special_tokens=False)["input_ids"]])
    kw = dict(custom_generate=apd_generate, dllm=d, R=0.5, W=4, M=8, max_new_tokens=30, do_sample=True,
              temperature=1.0, top_p=1.0, seed=3)
    steps = engine_steps
    free = ar.generate(ids, **kw)
    n_free = len(steps)
    text = tok.decode(free[0, ids.shape[1]:].tolist())
    stop = next(text[i:i + 3] for i in range(len(text) // 3, len(text) - 3)
                if len(tok(text[i:i + 3], add_special_tokens=False)["input_ids"]) >= 2
                and "\ufffd" not in text[i:i + 3])
    steps.clear()
    crit = StoppingCriteriaList([StopStringCriteria(tok, [stop])])
    early = ar.generate(ids, stopping_criteria=crit, stop_tokenizer=tok, **kw)
    got = tok.decode(early[0, ids.shape[1]:].tolist())
    assert got.endswith(stop) or stop in got
    assert torch.equal(early[0], free[0, : early.shape[1]])
    assert len(steps) <= n_free and early.shape[1] < free.shape[1]
