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
    with pytest.raises(NotImplementedError, match="loglikelihood"):
        lm.loglikelihood([])
    with pytest.raises(NotImplementedError, match="loglikelihood_rolling"):
        lm.loglikelihood_rolling([])
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
