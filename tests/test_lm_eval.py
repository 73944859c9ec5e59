"""lm-eval model "apd" on the embedded tiny pair (CPU): the shipped apd_arith task,
lm-eval's Python API and CLI against `apd sweep`'s code path, token equality
with apd_ext.generate, stop strings, sampling seeds and bad input."""
import json
import os
import subprocess
import sys
from types import SimpleNamespace

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # before datasets is imported: never the network
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

lm_eval = pytest.importorskip("lm_eval")

import apd_ext  # noqa: E402
from apd_ext.integrations.lm_eval import APDLM, task_dir  # noqa: E402
from apd_ext.tasks import arith  # noqa: E402
from apd_ext import tiny  # noqa: E402
from apd_ext.tiny.demo import encode_prompt, generated_text, load_pair  # noqa: E402

N = 4  # problems per run: two ragged batches of 3 and 1, small for CI
R, W, M, MAX_NEW = 0.7, 16, 56, 56
DLLM, AR = (str(p) for p in tiny.paths())
ARGS = dict(dllm=DLLM, verifier=AR, dtype="float32", device="cpu", R=R, W=W, M=M, batch_size=3)


class RecordingAPDLM(APDLM):
    """Records (prompt ids, seed, generated ids) of every request it decodes."""

    def _run(self, prompts, seeds, max_new, sampling, until=None):
        ids, secs, steps = super()._run(prompts, seeds, max_new, sampling, until)
        self.seen = getattr(self, "seen", []) + [(p.tolist(), s, g) for p, s, g in zip(prompts, seeds, ids)]
        self.seen_steps = getattr(self, "seen_steps", []) + list(steps)
        return ids, secs, steps


@pytest.fixture(scope="module")
def pair():
    return load_pair()  # (dllm, verifier, tokenizer), float32 on the CPU


@pytest.fixture(scope="module")
def probs():
    return arith.load_jsonl(tiny.test_file())[:N]


@pytest.fixture(scope="module")
def sweep_row(pair, probs):
    """`apd sweep`'s code path (apd_ext.tiny.sweep.run_config) on the same problems and settings."""
    from apd_ext.tiny.sweep import run_config
    dllm, ar, tok = pair
    args = SimpleNamespace(temperature=0.0, seed=0, max_new_tokens=MAX_NEW)
    return run_config({"method": "apd", "panel": "main", "R": R, "W": W, "M": M}, dllm, ar, tok, probs, args,
                      show=False)


def _task_manager():
    from lm_eval.tasks import TaskManager
    return TaskManager(include_path=str(task_dir()), include_defaults=False)


def _acc(results) -> float:
    # rounded as `apd sweep` rounds its accuracy column
    return round(results["results"]["apd_arith"]["exact_match,strict-match"], 4)


def test_task_reads_the_shipped_jsonl(probs):
    task = _task_manager().load(["apd_arith"])["tasks"]["apd_arith"]
    assert task.config.dataset_path == "json"
    docs = list(task.test_docs())
    assert len(docs) == 500
    for d, p in zip(docs, probs):
        assert task.doc_to_text(d) == arith.prompt_of(p.question)  # the prompt `apd sweep` encodes
        assert task.doc_to_target(d) == str(p.final)


def test_python_api_equals_sweep_and_generate(pair, probs, sweep_row, tmp_path):
    from lm_eval import simple_evaluate
    dllm, ar, tok = pair
    lm = RecordingAPDLM(**ARGS, stats_path=str(tmp_path / "stats.jsonl"))
    res = simple_evaluate(model=lm, tasks=["apd_arith"], task_manager=_task_manager(), limit=N, log_samples=True)
    assert _acc(res) == sweep_row["accuracy"]
    assert 0.0 < sweep_row["accuracy"]  # the pair solves some: a broken pipeline scoring 0 would not pass
    # Token for token: every request's ids == apd_ext.generate alone on that problem
    # (request i, in doc order, uses seed i); its recorded text == the text `apd sweep` scores.
    assert len(lm.seen) == N
    doc_of = {tuple(encode_prompt(tok, p.question)[0].tolist()): i for i, p in enumerate(probs)}
    texts = {s["doc_id"]: s["resps"][0][0] for s in res["samples"]["apd_arith"]}
    for prompt, seed, gen in lm.seen:
        i = doc_of[tuple(prompt)]
        out = apd_ext.generate(dllm, ar, torch.tensor([prompt]), R=R, W=W, M=M, temperature=0.0,
                               seed=i, max_new_tokens=MAX_NEW)
        assert seed == i and gen == out.generated(0).tolist()
        assert texts[i] == generated_text(tok, out)
    stats = [json.loads(line) for line in open(tmp_path / "stats.jsonl")]
    assert sorted(s["request"] for s in stats) == list(range(N))
    assert all(s["generated_tokens"] >= 1 and s["steps"] >= 1 for s in stats)
    assert res["config"]["apd_requests"] == N


def _instance(ctx: str, gen_kwargs: dict, i: int):
    from lm_eval.api.instance import Instance
    return Instance(request_type="generate_until", doc={}, arguments=(ctx, gen_kwargs), idx=i)


def test_until_and_sampling_seeds(pair, probs):
    dllm, ar, tok = pair
    lm = APDLM(**{**ARGS, "batch_size": 2}, seed=5)
    kw = {"until": ["\n"], "do_sample": True, "temperature": 0.5, "top_p": 0.9, "max_gen_toks": 24}
    reqs = [_instance(arith.prompt_of(p.question), dict(kw), i) for i, p in enumerate(probs[:3])]
    texts = lm.generate_until(reqs)
    for i, (p, text) in enumerate(zip(probs, texts)):
        out = apd_ext.generate(dllm, ar, encode_prompt(tok, p.question), R=R, W=W, M=M, temperature=0.5,
                               top_p=0.9, seed=5 + i, max_new_tokens=24)
        full = tok.decode(out.generated(0).tolist(), skip_special_tokens=True)
        assert "\n" in full  # the stop string occurs, so the cut is exercised
        assert text == full.split("\n")[0]  # cut at the first stop string, as lm-eval's HF model


@pytest.fixture(scope="module", params=["tiny", "qwen"])
def dirs(request, tmp_path_factory):
    if request.param == "tiny":
        return DLLM, AR
    from qwen_vocab import write_real_vocab_pair
    return write_real_vocab_pair(tmp_path_factory.mktemp("qv"))


def test_multi_token_until_stops_generation_early(dirs, probs):
    """A multi-token `until` string goes into the Engine's output path: the
    request ends at the step that produces it (fewer steps and ids than the
    run without it, the same ids up to there) and the text is cut before it."""
    args = {**ARGS, "dllm": dirs[0], "verifier": dirs[1], "batch_size": 2}
    kw = {"do_sample": True, "temperature": 0.8, "top_p": 1.0, "max_gen_toks": 40}
    ctxs = [arith.prompt_of(p.question) for p in probs[:2]]
    free = RecordingAPDLM(**args, seed=3)
    full = free.generate_until([_instance(c, {**kw, "until": []}, i) for i, c in enumerate(ctxs)])
    tok = free.tokenizer
    # A stop string of >= 2 tokens from the middle of the first text.
    stop = next(full[0][i:i + 4] for i in range(len(full[0]) // 4, len(full[0]) - 4)
                if len(tok(full[0][i:i + 4], add_special_tokens=False)["input_ids"]) >= 2
                and "\ufffd" not in full[0][i:i + 4])
    lm = RecordingAPDLM(**args, seed=3)
    got = lm.generate_until([_instance(c, {**kw, "until": [stop]}, i) for i, c in enumerate(ctxs)])
    assert got == [t.split(stop)[0] for t in full]
    by_seed = {s: (g, st) for (_, s, g), st in zip(free.seen, free.seen_steps)}
    for (_, s, g), st in zip(lm.seen, lm.seen_steps):
        g_free, st_free = by_seed[s]
        assert g == g_free[: len(g)]
    g0, st0 = next((g, st) for (_, s, g), st in zip(lm.seen, lm.seen_steps) if s == 3)
    assert len(g0) < len(by_seed[3][0]) and st0 < by_seed[3][1]  # the first request stopped early


def test_methods_leftright_ar_diffusion(pair, probs):
    dllm, ar, tok = pair
    ctx = arith.prompt_of(probs[0].question)
    kw = {"until": [], "do_sample": False, "max_gen_toks": 20}
    lr = APDLM(**{**ARGS, "method": "leftright", "K": 2}).generate_until([_instance(ctx, dict(kw), 0)])[0]
    ref = apd_ext.generate_leftright(dllm, encode_prompt(tok, probs[0].question), K=2, W=W, M=M,
                                     temperature=0.0, max_new_tokens=20)
    assert lr == tok.decode(ref.generated(0).tolist(), skip_special_tokens=True)
    g = APDLM(**{**ARGS, "method": "ar"}).generate_until([_instance(ctx, dict(kw), 0)])[0]
    ref = apd_ext.generate_ar(ar, encode_prompt(tok, probs[0].question), temperature=0.0, max_new_tokens=20)
    assert g == tok.decode(ref.generated(0).tolist(), skip_special_tokens=True)
    d = APDLM(**{**ARGS, "method": "diffusion", "steps": 4, "alg": "maskgit_plus"})
    d = d.generate_until([_instance(ctx, {**kw, "max_gen_toks": 8}, 0)])[0]
    ref = apd_ext.generate_diffusion(dllm, encode_prompt(tok, probs[0].question), 4, "maskgit_plus",
                                     temperature=0.0, top_p=1.0, max_new_tokens=8)
    assert d == tok.decode(ref.generated(0).tolist(), skip_special_tokens=True)


def test_chat_template_and_tokenizer_name():
    lm = APDLM(**ARGS)
    # The embedded pair's own template frames a user message as the task's prompt.
    assert lm.apply_chat_template([{"role": "user", "content": "Tom has 3 apples."}]) == \
        arith.prompt_of("Tom has 3 apples.")
    lm.tokenizer.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        lm.apply_chat_template([{"role": "user", "content": "hi"}])
    lm.tokenizer.chat_template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}" \
                                 "{% if add_generation_prompt %}<assistant>{% endif %}"
    chat = [{"role": "user", "content": "Question: 3 + 4?"}]
    assert lm.apply_chat_template(chat) == "<user>Question: 3 + 4?\n<assistant>"
    assert lm.apply_chat_template(chat, add_generation_prompt=False) == "<user>Question: 3 + 4?\n"
    assert "dllm" in lm.tokenizer_name


def test_bad_input():
    lm = APDLM(**ARGS)
    with pytest.raises(ValueError, match="unknown argument.*'Rx'"):
        APDLM(**ARGS, Rx=1)
    with pytest.raises(ValueError, match="model_args verifier"):
        APDLM(**{**ARGS, "verifier": "/no/such/folder"})
    with pytest.raises(ValueError, match="model_args method"):
        APDLM(**{**ARGS, "method": "beam"})
    with pytest.raises(ValueError, match="model_args steps"):
        APDLM(**{**ARGS, "method": "diffusion"})
    with pytest.raises(ValueError, match="R"):
        APDLM(**{**ARGS, "R": 1.5})
    with pytest.raises(ValueError, match="batch_size"):
        APDLM(**{**ARGS, "batch_size": "auto"})
    short = APDLM(**{**ARGS, "method": "ar", "max_length": 8})
    with pytest.raises(ValueError, match="request 1's continuation has .* max_length 8"):
        short.loglikelihood([_ll_instance("Question:", " 1", 0), _ll_instance("Question:", " 1 2 3 4 5 6 7 8 9", 1)])
    with pytest.raises(ValueError, match="mc_num"):
        APDLM(**ARGS, mc_num="many")
    with pytest.raises(ValueError, match="repetition_penalty"):
        lm.generate_until([_instance("Question: x\nAnswer:\n", {"until": [], "repetition_penalty": 1.1}, 0)])


def test_cli_equals_sweep(sweep_row, tmp_path):
    """`lm_eval --model apd --tasks <shipped yaml>` with no user import: the task file registers the model."""
    margs = ",".join(f"{k}={v}" for k, v in ARGS.items()) + f",stats_path={tmp_path / 'stats.jsonl'}"
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([os.path.dirname(os.path.dirname(apd_ext.__file__)),
                                          os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "lm_eval", "--model", "apd", "--model_args", margs,
           "--tasks", str(task_dir() / "apd_arith.yaml"), "--limit", str(N), "--output_path", str(tmp_path / "out")]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    (res,) = list((tmp_path / "out").rglob("results_*.json"))
    assert _acc(json.loads(res.read_text())) == sweep_row["accuracy"]
    lines = open(tmp_path / "stats.jsonl").readlines()
    assert len(lines) == N
    # `python -m apd_ext.integrations.lm_eval` puts the stats beside this results file
    from apd_ext.integrations.lm_eval import stats_next_to_results
    lm = APDLM(**ARGS)
    lm.request_stats = [json.loads(line) for line in lines]
    path = stats_next_to_results(lm, str(tmp_path / "out"), since=0.0)
    assert path.parent == res.parent and path.name == res.name.replace("results_", "apd_stats_") + "l"
    assert path.read_text() == "".join(lines)


# ---------------------------------------------------------------- loglikelihood (issue 26 item 11)

def _ll_instance(ctx: str, cont: str, i: int):
    from lm_eval.api.instance import Instance
    return Instance(request_type="loglikelihood", doc={}, arguments=(ctx, cont), idx=i)


@pytest.fixture(scope="module")
def hf_ar():
    """The verifier folder as transformers' own Qwen2ForCausalLM (fp32): the independent oracle."""
    from transformers import Qwen2ForCausalLM
    return Qwen2ForCausalLM.from_pretrained(AR, dtype=torch.float32, local_files_only=True).eval()


def _hf_logprob(model, ctx_ids, cont_ids):
    """sum log p(cont | ctx) and is_greedy under a transformers causal LM, one sequence, no batching."""
    ids = torch.tensor([ctx_ids + cont_ids])
    with torch.no_grad():
        lp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)  # [L, V]
    rows = lp[len(ctx_ids) - 1:len(ctx_ids) - 1 + len(cont_ids)]  # row j-1 predicts token j
    tok = torch.tensor(cont_ids)
    return float(rows.gather(1, tok[:, None]).sum()), bool((rows.argmax(-1) == tok).all())


def test_ar_loglikelihood_equals_transformers(pair, probs, hf_ar):
    _, _, tok = pair
    lm = APDLM(**{**ARGS, "method": "ar", "batch_size": 3})
    ctx = arith.prompt_of(probs[0].question)
    reqs = [(ctx, probs[0].answer), (ctx + " ", "Starts with"), (arith.prompt_of(probs[1].question), "Starts"),
            ("Question: Ava has", " 7 pens."), ("", "Ben has 3 cards."), (ctx, "banana 12 ####")]
    res = lm.loglikelihood([_ll_instance(c, x, i) for i, (c, x) in enumerate(reqs)])
    assert len(res) == len(reqs)
    for (c, x), (ll, greedy) in zip(reqs, res):
        # lm-eval's split, spelled out: trailing context spaces move to the continuation,
        # the joint encoding is cut at the context's length; "" -> the EOT token as context.
        n = len(c) - len(c.rstrip())
        c, x = (c[:-n], c[-n:] + x) if n else (c, x)
        whole = tok(c + x, add_special_tokens=False)["input_ids"]
        ci = tok(c, add_special_tokens=False)["input_ids"] if c else [lm.eot_token_id]
        xi = whole[len(ci):] if c else whole
        ref, ref_greedy = _hf_logprob(hf_ar, ci, xi)
        assert ll == pytest.approx(ref, rel=1e-4, abs=1e-3)
        assert greedy == ref_greedy
    assert res[0][0] > res[-1][0]  # the worked answer is likelier than a garbled one
    # batching never changes a score
    solo = [APDLM(**{**ARGS, "method": "ar", "batch_size": 1}).loglikelihood([_ll_instance(c, x, 0)])[0]
            for c, x in reqs[:2]]
    assert [s[0] for s in solo] == pytest.approx([r[0] for r in res[:2]], rel=1e-5, abs=1e-4)


def test_ar_loglikelihood_rolling_windows(pair, hf_ar):
    from lm_eval.api.instance import Instance
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
    _, _, tok = pair
    lm = APDLM(**{**ARGS, "method": "ar", "max_length": 23})  # odd window: 3+ windows per text
    texts = [arith.prompt_of(p.question) + p.answer for p in arith.load_jsonl(tiny.test_file())[:2]] + ["Hi"]
    out = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate(texts)])
    for t, ll in zip(texts, out):
        ids = tok(t, add_special_tokens=False)["input_ids"]
        wins = list(map(make_disjoint_window, get_rolling_token_windows(ids, lm.eot_token_id, 23, 1)))
        assert len(ids) < 23 or len(wins) >= 3
        # each window scored alone by transformers: the sum covers every token exactly once
        assert sum(len(x) for _, x in wins) == len(ids)
        ref = sum(_hf_logprob(hf_ar, c, x)[0] for c, x in wins)
        assert ll == pytest.approx(ref, rel=1e-4, abs=1e-3)
    with pytest.raises(NotImplementedError, match="method=ar"):
        APDLM(**ARGS).loglikelihood_rolling([Instance("loglikelihood_rolling", {}, ("x",), 0)])


@pytest.fixture(scope="module")
def hf_dllm():
    from apd_ext.reference_loop import load_hf_model
    return load_hf_model(DLLM)[0]


def _hf_dllm_logprob(model, seq, pos):
    """log p_dLLM(seq[pos] | the rest, seq[pos] masked): transformers' Qwen2 run bidirectionally
    (all-zero additive mask), the logits of row pos - 1 (Dream's shift)."""
    mask_id = apd_ext.load_model(DLLM, dtype=torch.float32, device="cpu").config.mask_token_id
    ids = torch.tensor([seq])
    ids[0, pos] = mask_id
    full = torch.zeros(1, 1, len(seq), len(seq))
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask={"full_attention": full}).logits[0].double()
    return float(torch.log_softmax(logits[pos - 1], -1)[seq[pos]])


def test_dream_mc_single_token(pair, probs, hf_dllm):
    """One scored token: with its mask drawn (p = 1) the weighted loss is the exact dLLM
    conditional; the estimator's expectation is that value, so the mean of many draws
    lands within its standard error; a seed fixes every draw."""
    from apd_ext.integrations.lm_eval import dream_mask_draws, dream_mc_nll, masked_nll
    dllm, _, tok = pair
    eos = dllm.config.eos_token_ids[0]
    ctx = tok(arith.prompt_of(probs[0].question) + "Starts with", add_special_tokens=False)["input_ids"]
    # A wrong start value: a token the pair does not predict, so the conditional is far from 0.
    cont = tok(f" {int(probs[0].answer.split()[2].rstrip('.')) + 1}", add_special_tokens=False)["input_ids"][:1]
    seq = ctx + cont + [eos]
    exact = -_hf_dllm_logprob(hf_dllm, seq, len(ctx))
    assert exact > 0.5
    full = masked_nll(dllm, seq, len(ctx), torch.ones(1, 1, dtype=torch.bool), torch.ones(1, dtype=torch.float64))
    assert float(full[0]) == pytest.approx(exact, rel=1e-4)
    half = masked_nll(dllm, seq, len(ctx), torch.tensor([[True], [False]]), torch.tensor([0.5, 0.25], dtype=torch.float64))
    assert half.tolist() == pytest.approx([2 * exact, 0.0], rel=1e-4)  # Dream's 1/p weighting

    n = 2048
    draws = masked_nll(dllm, seq, len(ctx), *dream_mask_draws(torch.Generator().manual_seed(1), n, 1))
    se = float(draws.std()) / n ** 0.5
    assert 0 < se < 0.1 * exact and abs(float(draws.mean()) - exact) < 4 * se
    kw = dict(eos=eos, mc_num=64, max_length=512)
    a = dream_mc_nll(dllm, ctx, cont, generator=torch.Generator().manual_seed(3), **kw)
    b = dream_mc_nll(dllm, ctx, cont, generator=torch.Generator().manual_seed(3), **kw)
    c = dream_mc_nll(dllm, ctx, cont, generator=torch.Generator().manual_seed(4), **kw)
    assert a == b and a != c and all(map(torch.isfinite, torch.tensor([a, c])))


def test_dream_mask_draws_stratified():
    from apd_ext.integrations.lm_eval import MC_EPS, dream_mask_draws
    mask, p = dream_mask_draws(torch.Generator().manual_seed(0), 1000, 7)
    assert mask.shape == (1000, 7) and p.shape == (1000,)
    # one u0, n evenly spaced ratios: one per stratum of width 1/n of [eps, 1)
    assert ((p - MC_EPS) / (1 - MC_EPS) * 1000).floor().sort().values.tolist() == list(range(1000))
    assert abs(float(mask.double().mean()) - float(p.mean())) < 0.02  # masked at rate p


def test_dream_mc_multi_token_seeds_agree(pair, probs):
    """A 5-token continuation: mean of the per-request estimates at two seeds agree within their errors."""
    from apd_ext.integrations.lm_eval import dream_mask_draws, masked_nll
    dllm, _, tok = pair
    eos = dllm.config.eos_token_ids[0]
    ctx = tok(arith.prompt_of(probs[1].question), add_special_tokens=False)["input_ids"]
    cont = tok(probs[1].answer, add_special_tokens=False)["input_ids"][:5]
    seq = ctx + cont + [eos]
    n = 512
    m = [masked_nll(dllm, seq, len(ctx), *dream_mask_draws(torch.Generator().manual_seed(s), n, 5)) for s in (10, 11)]
    se = (float(m[0].var() + m[1].var()) / n) ** 0.5
    assert torch.isfinite(m[0]).all() and float(m[0].mean()) > 0
    assert abs(float(m[0].mean() - m[1].mean())) < 4 * se


def test_dllm_loglikelihood_through_lm_eval(pair, probs):
    """method apd: loglikelihood = -dream_mc_nll with request i seeded seed + i; batching-free."""
    from apd_ext.integrations.lm_eval import dream_mc_nll
    dllm, _, tok = pair
    lm = APDLM(**ARGS, mc_num=16, seed=7)
    ctx = arith.prompt_of(probs[0].question) + "Starts with"
    reqs = [_ll_instance(ctx, f" {v}", i) for i, v in enumerate((3, 13))]
    res = lm.loglikelihood(reqs)
    for i, (r, v) in enumerate(zip(res, (3, 13))):
        c, x = lm._encode_pair(ctx, f" {v}")
        ref = dream_mc_nll(dllm, c, x, dllm.config.eos_token_ids[0], mc_num=16,
                           generator=torch.Generator().manual_seed(7 + i), max_length=lm.max_length)
        assert r == (-ref, False) and r[0] < 0
    with pytest.raises(ValueError, match="mc_num"):
        APDLM(**ARGS, mc_num=0)


def test_mc_task_data():
    from apd_ext.integrations.tasks.apd_arith_mc import utils as mc  # noqa: F401 (namespace package)
    items = [json.loads(line) for line in open(task_dir("apd_arith_mc") / "arith_mc_test.jsonl")]
    assert 100 <= len(items) <= 200
    for it in items:
        assert len(it["choices"]) == 4 == len(set(it["choices"]))
        assert it["choices"][it["label"]] == str(it["final"])
        assert it["worked"].rstrip().endswith("=") and "####" not in it["worked"]
    assert len({it["label"] for it in items}) == 4  # the gold position varies


def test_mc_task_cli_end_to_end(tmp_path, hf_ar, pair):
    """`apd-lm-eval --tasks apd_arith_mc` by name, method ar: acc and acc_norm equal an
    independent transformers scoring of the same docs; `lm_eval --tasks <yaml>` agrees."""
    _, _, tok = pair
    n = 6
    margs = f"verifier={AR},tokenizer={DLLM},method=ar,dtype=float32,device=cpu,batch_size=4"
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([os.path.dirname(os.path.dirname(apd_ext.__file__)),
                                          os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "apd_ext.integrations.lm_eval", "--model", "apd", "--model_args", margs,
           "--tasks", "apd_arith_mc", "--limit", str(n), "--output_path", str(tmp_path / "out")]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    (res,) = list((tmp_path / "out").rglob("results_*.json"))
    got = json.loads(res.read_text())["results"]["apd_arith_mc"]
    items = [json.loads(line) for line in open(task_dir("apd_arith_mc") / "arith_mc_test.jsonl")][:n]
    acc = acc_norm = 0
    for it in items:
        ctx = arith.prompt_of(it["question"]) + it["worked"]
        cids = tok(ctx, add_special_tokens=False)["input_ids"]
        lls = []
        for ch in it["choices"]:
            whole = tok(ctx + " " + ch, add_special_tokens=False)["input_ids"]
            assert whole[:len(cids)] == cids
            lls.append(_hf_logprob(hf_ar, cids, whole[len(cids):])[0])
        norm = [ll / len((" " + ch).encode()) for ll, ch in zip(lls, it["choices"])]
        acc += max(range(4), key=lls.__getitem__) == it["label"]
        acc_norm += max(range(4), key=norm.__getitem__) == it["label"]
    assert got["acc,none"] == pytest.approx(acc / n)
    assert got["acc_norm,none"] == pytest.approx(acc_norm / n)
    # plain `lm_eval` on the task file: its utils.py registers the model; same scores
    cmd = [sys.executable, "-m", "lm_eval", "--model", "apd", "--model_args", margs, "--tasks",
           str(task_dir("apd_arith_mc") / "apd_arith_mc.yaml"), "--limit", str(n), "--output_path", str(tmp_path / "o2")]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    (res,) = list((tmp_path / "o2").rglob("results_*.json"))
    plain = json.loads(res.read_text())["results"]["apd_arith_mc"]
    assert (plain["acc,none"], plain["acc_norm,none"]) == (got["acc,none"], got["acc_norm,none"])


def test_mc_task_dllm_python_api(pair):
    """method apd on apd_arith_mc through simple_evaluate: every choice's logged
    loglikelihood is Dream's estimate recomputed alone (request doc * 4 + choice,
    seeded seed + that index), and acc follows from them."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager
    from apd_ext.integrations.lm_eval import dream_mc_nll
    dllm, _, tok = pair
    n, mc = 3, 8
    lm = APDLM(**ARGS, method="apd", mc_num=mc, seed=2)
    tm = TaskManager(include_path=str(task_dir().parent), include_defaults=False)
    res = simple_evaluate(model=lm, tasks=["apd_arith_mc"], task_manager=tm, limit=n, log_samples=True)
    samples = sorted(res["samples"]["apd_arith_mc"], key=lambda s: s["doc_id"])
    hits = 0
    for s in samples:
        d = s["doc"]
        ctx = arith.prompt_of(d["question"]) + d["worked"]
        lls = [float(r[0][0]) for r in s["resps"]]
        for c, ll in enumerate(lls):
            ci, xi = lm._encode_pair(ctx, " " + d["choices"][c])
            ref = dream_mc_nll(dllm, ci, xi, dllm.config.eos_token_ids[0], mc_num=mc, max_length=lm.max_length,
                               generator=torch.Generator().manual_seed(2 + 4 * s["doc_id"] + c))
            assert ll == pytest.approx(-ref, rel=1e-6)
        hits += max(range(4), key=lls.__getitem__) == d["label"]
    assert res["results"]["apd_arith_mc"]["acc,none"] == pytest.approx(hits / n)
