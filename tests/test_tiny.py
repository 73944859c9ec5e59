"""The embedded tiny pair: task generator, shipped checkpoints, accuracy bars, sweep."""

import csv
import json
import re

import pytest
import torch

from apd_ext.tasks import arith
# Imported under another name: a module-level `test_file` would be collected as a test.
from apd_ext.tiny import DEFAULTS, paths, test_file as arith_test_file, test_file_1op as one_op_file

DLLM_DIR, AR_DIR = paths()
_STEP = re.compile(r"^(\w+)(?: in)?(?: (\d+))?: (\d+) ([-+*/]) (\d+) = (\d+)\.$")


# ----------------------------------------------------------------------------- task

def test_generator_deterministic_per_seed():
    a = arith.make_split("train", 40, seed=3)
    b = arith.make_split("train", 40, seed=3)
    c = arith.make_split("train", 40, seed=4)
    assert a == b
    assert [p.question for p in a] != [p.question for p in c]


def test_splits_disjoint_by_construction():
    train = {p.question for p in arith.make_split("train", 3000, seed=0)}
    test = {p.question for p in arith.make_split("test", 3000, seed=0)}
    assert len(test) == 3000 and not train & test
    assert all(arith.split_of(q) == "train" for q in train)
    assert all(arith.split_of(q) == "test" for q in test)
    with pytest.raises(ValueError, match="split"):
        next(arith.stream("valid", 0))


def test_answers_are_correct_step_by_step():
    for p in arith.make_split("train", 300, seed=1) + arith.load_jsonl(arith_test_file()):
        lines = p.answer.split("\n")
        assert lines[-1] == f"#### {p.final}"
        cur = int(re.fullmatch(r"Starts with (\d+)\.", lines[0]).group(1))
        assert 2 <= len(lines) - 2 <= 4
        for line in lines[1:-1]:
            m = _STEP.match(line)
            assert m, line
            a, op, b, c = int(m.group(3)), m.group(4), int(m.group(5)), int(m.group(6))
            assert a == cur
            want = {"+": a + b, "-": a - b, "*": a * b, "/": a // b}[op]
            assert c == want and 1 <= c <= 50 and (op != "/" or a % b == 0)
            cur = c
        assert cur == p.final


def _check_steps(p):
    lines = p.answer.split("\n")
    cur = int(re.match(r"^Starts with (\d+)\.$", lines[0]).group(1))
    for ln in lines[1:-1]:
        m = _STEP.match(ln)
        assert m, ln
        a, op, b, c = int(m.group(3)), m.group(4), int(m.group(5)), int(m.group(6))
        assert a == cur and c == {"+": a + b, "-": a - b, "*": a * b, "/": a // b}[op]
        assert op != "/" or a % b == 0
        assert 1 <= c <= arith._MAXV
        cur = c
    assert lines[-1] == f"#### {cur}" and p.final == cur
    return len(lines) - 2


def test_varied_style_answers_and_op_counts():
    """The varied style: right step-by-step answers, n_ops events, its phrasings all drawn."""
    probs = arith.make_split("train", 400, seed=5, style="varied")
    counts = {_check_steps(p) for p in probs}
    assert counts == {1, 2, 3, 4}
    for n in (1, 3):
        assert {_check_steps(p) for p in arith.make_split("test", 50, seed=5, style="varied", n_ops=n)} == {n}
    text = " ".join(p.question for p in probs)
    for phrase in ("gives away", " gets ", " sells ", " buys ", "have left?", "are left?", "have now?"):
        assert phrase in text, phrase
    assert probs == arith.make_split("train", 400, seed=5, style="varied")  # deterministic
    with pytest.raises(ValueError, match="n_ops"):
        arith.generate_varied(__import__("random").Random(0), n_ops=5)
    with pytest.raises(ValueError, match="style"):
        next(arith.stream("train", 0, style="fancy"))


def test_one_op_held_out_file():
    """200 one-event problems, regenerable, all in the test split (so never in any train stream)."""
    from apd_ext.tiny.train import finetune_problems, make_1op_test
    probs = arith.load_jsonl(one_op_file())
    assert len(probs) == 200 and len({p.question for p in probs}) == 200
    assert probs == make_1op_test(0)
    assert all(_check_steps(p) == 1 and arith.split_of(p.question) == "test" for p in probs)
    train = {p.question for p in finetune_problems(4000, 0)}
    assert not train & {p.question for p in probs}


def test_pair_tokenizer_loads_without_warnings(caplog):
    """The README's tokenizer line, the lm-eval model and the serve replicas load the
    pair's tokenizer through apd_ext.load_tokenizer: no "model of type Dream"
    log line and no rope_scaling FutureWarning (AutoTokenizer on the Dream folder
    gives both)."""
    import logging
    import warnings

    import apd_ext
    caplog.set_level(logging.WARNING)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for d in (DLLM_DIR, AR_DIR):
            tok = apd_ext.load_tokenizer(d)
            assert tok("Question: Ava has 12 apples.", add_special_tokens=False)["input_ids"]
        lm_eval = pytest.importorskip("apd_ext.integrations.lm_eval")
        lm_eval.APDLM(dllm=str(DLLM_DIR), verifier=str(AR_DIR), dtype="float32", device="cpu")
    assert not [r for r in caplog.records if "model of type" in r.getMessage()]


def test_scorer_hand_written():
    assert arith.score("3 + 4 = 7.\n#### 7", 7)
    assert arith.score("####7", 7)
    assert arith.score("#### 12\n#### 13", 12)      # the first final answer counts
    assert not arith.score("#### 71", 7)
    assert not arith.score("3 + 4 = 7.", 7)          # no final marker
    assert not arith.score("#### -7", 7)
    assert arith.score("#### -7", -7)
    assert arith.extract_answer("nothing") is None


def test_shipped_test_file():
    probs = arith.load_jsonl(arith_test_file())
    assert len(probs) == 500 and len({p.question for p in probs}) == 500
    assert probs == arith.make_split("test", 500, seed=0)  # regenerable from the seed
    assert all(arith.score(p.answer, p.final) for p in probs)


# ----------------------------------------------------------------------------- checkpoints

def test_checkpoint_files_and_size():
    total = 0
    for d in (DLLM_DIR, AR_DIR):
        for f in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
                  "tokenizer_config.json", "special_tokens_map.json"):
            assert (d / f).is_file(), d / f
        total += (d / "model.safetensors").stat().st_size
    assert total <= 25e6
    assert (DLLM_DIR / "tokenizer.json").read_bytes() == (AR_DIR / "tokenizer.json").read_bytes()
    dc = json.loads((DLLM_DIR / "config.json").read_text())
    ac = json.loads((AR_DIR / "config.json").read_text())
    assert dc["model_type"] == "Dream" and dc["architectures"] == ["DreamModel"]
    assert ac["model_type"] == "qwen2" and ac["architectures"] == ["Qwen2ForCausalLM"]
    for k in ("mask_token_id", "eos_token_id", "pad_token_id", "bos_token_id"):
        assert isinstance(dc[k], int)
    arch = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "intermediate_size", "vocab_size", "rope_theta")
    assert {k: dc[k] for k in arch} == {k: ac[k] for k in arch}
    assert dc["vocab_size"] <= 1024


def test_tokenizer_round_trip():
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer
    from apd_ext.tiny import tokenizer
    tok = AutoTokenizer.from_pretrained(str(DLLM_DIR), local_files_only=True)
    raw = Tokenizer.from_file(str(AR_DIR / "tokenizer.json"))  # the verifier's file, read verbatim
    dc = json.loads((DLLM_DIR / "config.json").read_text())
    assert len(tok) <= 1024 and len(tokenizer()) == len(tok)
    assert tok.eos_token_id == dc["eos_token_id"] and tok.pad_token_id == dc["pad_token_id"]
    assert tok.mask_token_id == dc["mask_token_id"]
    assert len({tok.eos_token_id, tok.pad_token_id, tok.mask_token_id}) == 3
    texts = [arith.prompt_of(p.question) + p.answer for p in arith.load_jsonl(arith_test_file())[:50]]
    texts.append("Zed  has\t7 yaks! \u00c4\u00d6 12.5 #### 3")
    for text in texts:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert ids == raw.encode(text).ids
        assert tok.decode(ids) == text
    # every number the task uses is one token, so the models never see split digits
    assert all(len(tok(f" {n}", add_special_tokens=False)["input_ids"]) == 1 for n in range(1, 51))


def test_ar_folder_autotokenizer_same_ids():
    """The verifier's folder and the pair's tokenizer agree on what the models see.

    transformers < 5: AutoTokenizer on either folder gives the same ids.
    transformers >= 5 maps every model_type "qwen2" folder to Qwen2Tokenizer
    (a hard-coded pre-tokenizer that splits digits), so the pair's tokenizer is
    loaded from the dLLM folder (apd_ext.tiny.tokenizer(), demo.load_pair and
    `apd generate` all do): that path must give the verifier's tokenizer.json
    ids, and the AR folder's AutoTokenizer must still pass check_compatible
    (same vocabulary and special ids, what `apd generate` checks) and agree on
    digit-free text."""
    import transformers
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer
    a = AutoTokenizer.from_pretrained(str(AR_DIR), local_files_only=True)
    d = AutoTokenizer.from_pretrained(str(DLLM_DIR), local_files_only=True)
    texts = [arith.prompt_of(p.question) + p.answer for p in arith.load_jsonl(arith_test_file())[:50]]
    if int(transformers.__version__.split(".")[0]) < 5:
        for text in texts:
            assert a(text, add_special_tokens=False)["input_ids"] == d(text, add_special_tokens=False)["input_ids"]
        return
    import apd_ext
    from apd_ext import cli
    from apd_ext.tiny import tokenizer
    from apd_ext.tiny.demo import load_pair
    raw = Tokenizer.from_file(str(AR_DIR / "tokenizer.json"))  # the verifier's ids, read verbatim
    pair_toks = {"tiny.tokenizer": tokenizer(), "demo.load_pair": load_pair()[2],
                 "cli._load_tokenizer": cli._load_tokenizer(str(DLLM_DIR))}
    for name, tok in pair_toks.items():
        for text in texts:
            assert tok(text, add_special_tokens=False)["input_ids"] == raw.encode(text).ids, (name, text)
    assert a.get_vocab() == d.get_vocab()
    assert (a.eos_token_id, a.pad_token_id) == (d.eos_token_id, d.pad_token_id)
    dllm = apd_ext.load_model(str(DLLM_DIR), dtype=torch.float32, device="cpu")
    ar = apd_ext.load_model(str(AR_DIR), dtype=torch.float32, device="cpu")
    apd_ext.check_compatible(dllm, ar, d, a)
    for text in ("Question: Tom has some apples.\nAnswer:\n", "Zed  has\tyaks! \u00c4\u00d6 ####"):
        assert a(text, add_special_tokens=False)["input_ids"] == raw.encode(text).ids


def _transformers_model(d):
    from apd_ext.tiny.hf_models import load_exported
    return load_exported(d)


def test_bidirectional_mask_reaches_earlier_rows():
    from apd_ext.tiny.hf_models import bidir_mask, dllm_logits
    model = _transformers_model(DLLM_DIR)
    ids = torch.tensor([[5, 9, 14, 20, 33, 41, 7]])
    ids2 = ids.clone()
    ids2[0, 5] = 2
    keys = torch.ones_like(ids, dtype=torch.bool)
    with torch.no_grad():
        a = model(input_ids=ids, attention_mask=bidir_mask(keys)).logits
        b = model(input_ids=ids2, attention_mask=bidir_mask(keys)).logits
        c = model(input_ids=ids).logits
        d = model(input_ids=ids2).logits
        s = dllm_logits(model, ids, keys)
    assert (a[0, 0] - b[0, 0]).abs().max() > 1e-4   # a later token changes row 0
    assert torch.equal(c[0, :5], d[0, :5])            # the causal AR run does not
    assert torch.equal(s[0, 1:], a[0, :-1])           # Dream shift: row i from hidden i - 1


def test_load_through_apd_ext_matches_transformers():
    import apd_ext
    dllm = apd_ext.load_model(str(DLLM_DIR), dtype=torch.float32, device="cpu")
    ar = apd_ext.load_model(str(AR_DIR), dtype=torch.float32, device="cpu")
    apd_ext.check_compatible(dllm, ar)
    from transformers import AutoModelForCausalLM
    hf_ar = AutoModelForCausalLM.from_pretrained(str(AR_DIR), local_files_only=True,
                                                 dtype=torch.float32).eval()
    mine = _transformers_model(AR_DIR)
    ids = torch.tensor([[5, 9, 14, 20, 33, 41, 7]])
    with torch.no_grad():
        torch.testing.assert_close(hf_ar(input_ids=ids).logits, mine(input_ids=ids).logits)


# ----------------------------------------------------------------------------- accuracy bars

SLICE = slice(0, 20)


@pytest.fixture(scope="module")
def pair():
    from apd_ext.tiny.demo import load_pair
    return load_pair()


def _accuracy(run, tok, probs):
    from apd_ext.tiny.demo import encode_prompt, generated_text
    ok = gen = fw = 0
    for p in probs:
        out = run(encode_prompt(tok, p.question))
        ok += arith.score(generated_text(tok, out), p.final)
        gen += out.stats.generated_tokens
        fw += out.stats.dllm_forwards
    return ok / len(probs), gen / max(1, fw)


def test_accuracy_bars_on_fixed_slice(pair):
    import apd_ext
    from apd_ext.tiny.demo import DEFAULT_M, DEFAULT_R, DEFAULT_W, MAX_NEW
    dllm, ar, tok = pair
    probs = arith.load_jsonl(arith_test_file())[SLICE]
    kw = dict(temperature=0.0, seed=0, max_new_tokens=MAX_NEW)
    ar_acc, _ = _accuracy(lambda x: apd_ext.generate_ar(ar, x, **kw), tok, probs)
    k1_acc, k1_tpf = _accuracy(lambda x: apd_ext.generate_leftright(dllm, x, K=1, **kw), tok, probs)
    apd_acc, apd_tpf = _accuracy(lambda x: apd_ext.generate(dllm, ar, x, R=DEFAULT_R, W=DEFAULT_W,
                                                            M=DEFAULT_M, **kw), tok, probs)
    assert ar_acc >= 0.70, ar_acc
    assert k1_acc >= 0.60, k1_acc
    assert k1_tpf == pytest.approx(1.0)
    assert apd_acc >= k1_acc - 0.05, (apd_acc, k1_acc)
    assert apd_tpf >= 2.5, apd_tpf


# ----------------------------------------------------------------------------- sweep

def test_one_op_slice_accuracy(pair):
    """The one-event held-out slice (the README's kind of question): AR greedy and
    APD at the embedded pair's defaults both >= 90% on all 200 problems."""
    import apd_ext
    dllm, ar, tok = pair
    probs = arith.load_jsonl(one_op_file())
    kw = dict(temperature=0.0, seed=0, max_new_tokens=DEFAULTS["max_new_tokens"])
    ar_acc, _ = _accuracy(lambda x: apd_ext.generate_ar(ar, x, **kw), tok, probs)
    apd_acc, apd_tpf = _accuracy(lambda x: apd_ext.generate(dllm, ar, x, apd_ext.tiny.apd_config()), tok, probs)
    assert ar_acc >= 0.90, ar_acc
    assert apd_acc >= 0.90, apd_acc
    assert apd_tpf >= 2.5, apd_tpf


def test_sweep_writes_csv_and_png(tmp_path):
    from apd_ext.tiny import sweep
    prefix = tmp_path / "sw"
    assert sweep.main(["--limit", "5", "--out", str(prefix), "--quiet"]) == 0
    rows = list(csv.DictReader(open(prefix.with_suffix(".csv"))))
    assert len(rows) == len(sweep.configs())
    assert {r["method"] for r in rows} == {"ar_greedy", "leftright", "apd"}
    for r in rows:
        assert r["n"] == "5" and 0.0 <= float(r["accuracy"]) <= 1.0
        assert float(r["tokens_per_forward"]) > 0 and float(r["tokens_per_s"]) > 0
    k1 = next(r for r in rows if r["method"] == "leftright" and r["K"] == "1")
    assert float(k1["tokens_per_forward"]) == pytest.approx(1.0)
    pytest.importorskip("matplotlib")
    assert prefix.with_suffix(".png").stat().st_size > 1000
