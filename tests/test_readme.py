"""Every ```python and ```bash block of README.md runs, against the embedded
tiny pair.

The extractor is general: a block added to the README later is run too, unless
it is on SKIP below with the reason it cannot run in the test suite (a GPU,
the real 7B checkpoints, network, or a run of minutes). Each block runs in a
fresh process in a scratch folder; `apd` and `python` are this interpreter.
Python blocks run exactly as written (they use the embedded pair and
device="auto"); only bash blocks that name the real checkpoint folders or
--device cuda get the substitutions of SUBSTITUTE. Blocks in other languages
(cmake, plain ```) are not code a user runs as-is.

The README's answers are checked, not only its exit codes: ANSWERS lists what
each block that answers a word problem must print, and every word problem the
README asks the tiny pair is answered right through the CLI. Python blocks run
with FutureWarning as an error, and no block may print transformers'
"model of type" warning (issue 26: their causes are fixed, not silenced).
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import apd_ext
from apd_ext.tiny import paths
from skips import not_applicable

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
_FENCE = re.compile(r"^```(python|bash)[ \t]*\n(.*?)^```[ \t]*$", re.S | re.M)

# A substring that identifies the block -> why it does not run here.
SKIP = {
    "make demo": "runs the whole set-up (venv, torch install, build): minutes; timed by hand on a fresh clone",
    "pip install .": "builds and installs the package in an isolated environment (network, minutes)",
    "hf download": "downloads the real Dream-7B / Qwen2.5-0.5B checkpoints (about 16 GB, network)",
    "apd_ext.tiny.train": "retrains the tiny pair and runs 500-problem evaluations and a sweep: about an hour",
    "fetch_device_wheels.sh": "downloads wheels (network) for the GPU check, which needs a GPU",
    "apd bench --device cuda": "needs a GPU; tests/test_cli.py::test_bench_writes_csv_and_plot runs the CPU "
                               "bench at small settings",
    "--tasks gsm8k": "lm-eval's gsm8k task downloads its data set (network) and the recipe needs the real "
                     "checkpoints and a GPU; tests/test_lm_eval.py runs the lm-eval CLI on the tiny pair",
    "apd serve --dllm DIR": "installs the serve extra (network) and starts a server that runs until it is stopped; tests/test_serve.py starts "
                            "`apd serve` on 127.0.0.1 and sends these requests",
}

_DLLM, _AR = (str(p) for p in paths())
# (README text, what the test runs instead), applied in order to bash blocks only.
SUBSTITUTE = [
    ("./Dream-v0-Instruct-7B", _DLLM),   # the real checkpoint folders -> the embedded tiny pair
    ("./Qwen2.5-0.5B", _AR),
    ("--device cuda", "--device cpu"),   # no GPU in the test suite
    (" --chat", ""),                     # the tiny tokenizer has no chat template
]

# A substring that identifies the block -> what its output must contain, in this order.
ANSWERS = {
    "How many apples does Ava have now?": ["#### 15"],                       # the Python snippet
    "custom_generate=apd_generate": ["#### 20", "#### 6"],                    # the transformers snippet
    "apd demo --index 7": ["correct)", "Answer: 22", "#### 15"],              # test problem 7, then the two questions
}

# Every word problem the README asks the tiny pair, with its answer.
README_QUESTIONS = {
    "Ava has 12 apples. She buys 3 more apples. How many apples does Ava have now?": 15,
    "Rosa has 13 apples. She buys 7 more apples. How many apples does Rosa have now?": 20,
    "Max has 9 pens. He loses 3 pens. How many pens does Max have now?": 6,
    "Mia has 9 coins. She doubles her coins. Leo gives her 4 coins. How many coins does Mia have now?": 22,
    "Ben has 20 cards. He sells 5 cards. How many cards does Ben have now?": 15,
    "Ava has 12 apples. She buys 3 more apples. She gives 4 apples to Max. How many apples does Ava have now?": 11,
}
_QUESTION = re.compile(r"[A-Z][a-z]+ has \d+ [a-z]+\.[^\"\n]*?\?")


def blocks(text: str) -> list:
    """[(line number, language, code)] of every ```python / ```bash block."""
    return [(text.count("\n", 0, m.start()) + 1, m.group(1), m.group(2)) for m in _FENCE.finditer(text)]


def skip_reason(code: str):
    hits = [why for key, why in SKIP.items() if key in code]
    return hits[0] if hits else None


def substitute(code: str, lang: str = "bash") -> str:
    if lang != "bash":
        return code
    for old, new in SUBSTITUTE:
        code = code.replace(old, new)
    return code


_BLOCKS = blocks(README.read_text())


def test_the_extractor_finds_the_blocks():
    langs = [lang for _, lang, _ in _BLOCKS]
    assert langs.count("python") >= 2 and langs.count("bash") >= 4
    runnable = [b for b in _BLOCKS if skip_reason(b[2]) is None]
    assert len(runnable) >= 4
    sample = "x\n```python\nprint(1)\n```\n```cmake\nno\n```\n```bash\necho a\n```\n"
    assert blocks(sample) == [(2, "python", "print(1)\n"), (8, "bash", "echo a\n")]


def test_every_skip_entry_matches_a_block():
    """A stale skip-list entry would hide nothing today but something tomorrow."""
    for key in SKIP:
        assert any(key in code for _, _, code in _BLOCKS), f"SKIP[{key!r}] matches no README block"


def test_python_blocks_run_as_written():
    """No python block needs a substitution to run here: a user runs them verbatim."""
    for line, lang, code in _BLOCKS:
        if lang == "python" and skip_reason(code) is None:
            live = "\n".join(ln.split("#")[0] for ln in code.splitlines())  # comments may name them
            assert all(old not in live for old, _ in SUBSTITUTE), f"README.md:{line}"
            assert 'device="cuda"' not in live, f"README.md:{line}: CUDA-only"


def test_every_readme_question_is_listed():
    """A word problem added to the README must be added (with its answer) to README_QUESTIONS."""
    asked = set(_QUESTION.findall(README.read_text()))
    assert asked, "the pattern finds no question"
    assert asked <= set(README_QUESTIONS), sorted(asked - set(README_QUESTIONS))
    for key in ANSWERS:
        assert any(key in code for _, _, code in _BLOCKS), f"ANSWERS[{key!r}] matches no README block"


@pytest.mark.parametrize("question", sorted(README_QUESTIONS))
def test_readme_question_answered_by_the_cli(question, capsys):
    """`apd generate --prompt QUESTION` on the embedded pair, the README's defaults."""
    from apd_ext import cli
    from apd_ext.tasks import arith

    assert cli.main(["generate", "--prompt", question, "--json"]) == 0
    text = json.loads(capsys.readouterr().out)["text"]
    assert arith.extract_answer(text) == README_QUESTIONS[question], text


def test_snippet_has_no_hub_names():
    """Paths in load_model calls are local folders (the loader never downloads)."""
    for _, lang, code in _BLOCKS:
        for arg in re.findall(r"load_model\(\s*\"([^\"]+)\"", code):
            assert arg.startswith(("./", "/", "~")), arg


@pytest.fixture(scope="module")
def shims(tmp_path_factory):
    """A bin folder where `apd` and `python` are this interpreter with this package."""
    bin_dir = tmp_path_factory.mktemp("bin")
    (bin_dir / "apd").write_text(f'#!/bin/sh\nexec "{sys.executable}" -m apd_ext.cli "$@"\n')
    (bin_dir / "python").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    return bin_dir


@pytest.mark.parametrize("line,lang,code", _BLOCKS, ids=[f"L{l}-{g}" for l, g, _ in _BLOCKS])
def test_readme_block_runs(line, lang, code, shims, tmp_path):
    why = skip_reason(code)
    if why:
        not_applicable(f"README.md:{line}: {why}")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1",
               PYTHONWARNINGS="error::FutureWarning",
               PATH=f"{shims}{os.pathsep}{os.environ.get('PATH', '')}",
               # the apd_ext this test imported (source tree with an in-place build, or installed)
               PYTHONPATH=os.pathsep.join([str(Path(apd_ext.__file__).parent.parent),
                                           os.environ.get("PYTHONPATH", "")]))
    code = substitute(code, lang)
    cmd = [sys.executable, "-c", code] if lang == "python" else ["bash", "-euo", "pipefail", "-c", code]
    r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"README.md:{line} ({lang}) failed:\n{code}\n--- stdout\n{r.stdout}\n--- stderr\n{r.stderr}"
    assert "Traceback" not in r.stderr, r.stderr
    assert "model of type" not in r.stderr and "FutureWarning" not in r.stderr, r.stderr
    for key, wanted in ANSWERS.items():
        if key in code:
            at = 0
            for want in wanted:  # in order; "#### 2" must not match "#### 20"
                m = re.compile(re.escape(want) + r"(?!\d)").search(r.stdout, at)
                assert m, f"README.md:{line}: expected {want!r} after offset {at} in:\n{r.stdout}"
                at = m.end()
