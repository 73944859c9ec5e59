"""The `apd` command on tiny random checkpoints with a tiny byte-level tokenizer."""
import json
import os
import subprocess
import sys

import pytest

from apd_ext import cli
from tests.model_utils import make_tiny_dream, make_tiny_qwen2

VOCAB, MASK = 509, 508
SPECIALS = {"<|pad|>": 0, "<|bos|>": 1, "<|endoftext|>": 2}


def write_tokenizer(folder, swap: bool = False) -> None:
    """Byte-level BPE without merges: ids 0-2 special, 3-258 the 256 bytes,
    then filler tokens up to the mask token at 508 (all fit the 509-row vocab).
    swap=True exchanges two byte tokens (a tokenizer that disagrees)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = dict(SPECIALS)
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    if swap:
        alphabet[10], alphabet[11] = alphabet[11], alphabet[10]
    for i, ch in enumerate(alphabet):
        vocab[ch] = 3 + i
    for i in range(3 + len(alphabet), MASK):
        vocab[f"<|x{i}|>"] = i
    vocab["<|mask|>"] = MASK
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|endoftext|>", pad_token="<|pad|>",
        mask_token="<|mask|>",
        additional_special_tokens=[f"<|x{i}|>" for i in range(3 + len(alphabet), MASK)],
    )
    fast.chat_template = "{% for m in messages %}<|bos|>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}" \
                         "{% if add_generation_prompt %}assistant: {% endif %}"
    fast.save_pretrained(os.fspath(folder))


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("apd_cli")
    make_tiny_dream(root / "dream", vocab=VOCAB, seed=0, mask_token_id=MASK)
    make_tiny_qwen2(root / "qwen", vocab=VOCAB, seed=1)
    write_tokenizer(root / "dream")
    write_tokenizer(root / "qwen")
    make_tiny_qwen2(root / "other", vocab=VOCAB, seed=1)
    write_tokenizer(root / "other", swap=True)
    return root


def _gen_args(root, *extra):
    return ["generate", "--dllm", str(root / "dream"), "--verifier", str(root / "qwen"),
            "--prompt", "Hello there, 2+3=", "--max-new-tokens", "12", "--device", "cpu", *extra]


def test_generate_streams_text_and_stats(ckpts, capsys):
    assert cli.main(_gen_args(ckpts, "--temperature", "0.7", "--W", "4", "--M", "8", "--seed", "1")) == 0
    out = capsys.readouterr().out
    lines = out.rstrip("\n").split("\n")
    assert lines[-2].startswith("--- apd: ") and "tokens/s" in lines[-2]
    assert "dLLM" in lines[-1] and "verifier" in lines[-1] and "sampling" in lines[-1]
    assert "\033[" not in out  # not a terminal: no colour codes
    text = "\n".join(lines[:-2])
    assert text.strip(), "no generated text was printed"


def test_generate_json(ckpts, capsys):
    assert cli.main(_gen_args(ckpts, "--json", "--R", "0.5", "--W", "none", "--temperature", "0.7")) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["method"] == "apd" and res["config"]["apd"]["W"] is None
    assert res["num_generated"] == len(res["token_ids"]) <= 12
    assert sum(res["accepted_per_step"]) == res["num_generated"]
    assert res["stats"]["steps"] == len(res["accepted_per_step"]) and res["stats"]["seconds"] > 0
    assert isinstance(res["text"], str)


def test_json_matches_the_library(ckpts, capsys):
    import torch
    from transformers import AutoTokenizer

    import apd_ext

    assert cli.main(_gen_args(ckpts, "--json", "--seed", "4", "--temperature", "0.7", "--chat")) == 0
    res = json.loads(capsys.readouterr().out)
    tok = AutoTokenizer.from_pretrained(str(ckpts / "dream"), local_files_only=True)
    ids = tok.apply_chat_template([{"role": "user", "content": "Hello there, 2+3="}], add_generation_prompt=True,
                                  tokenize=True)
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    assert res["prompt_tokens"] == len(ids)
    out = apd_ext.generate(apd_ext.load_model(ckpts / "dream"), apd_ext.load_model(ckpts / "qwen"),
                           torch.tensor([ids]), seed=4, temperature=0.7, max_new_tokens=12)
    assert res["token_ids"] == out.generated(0).tolist()


@pytest.mark.parametrize("method,extra", [("leftright", ["--K", "2"]), ("diffusion", ["--steps", "3"]),
                                          ("ar", [])])
def test_baseline_methods(ckpts, capsys, method, extra):
    assert cli.main(_gen_args(ckpts, "--json", "--method", method, *extra)) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["method"] == method and 1 <= res["num_generated"] <= 12


def test_mismatched_tokenizer_is_refused(ckpts, capsys):
    args = _gen_args(ckpts)
    args[args.index("--verifier") + 1] = str(ckpts / "other")
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("apd: error:") and "the tokenizers differ" in err and "incompatible" in err


@pytest.mark.parametrize("extra,needle", [(["--R", "1.5"], "R"), (["--M", "0"], "M"),
                                          (["--dllm", "/nonexistent/folder"], "--dllm")])
def test_bad_arguments(ckpts, capsys, extra, needle):
    assert cli.main(_gen_args(ckpts, *extra)) == 2
    err = capsys.readouterr().err
    assert err.startswith("apd: error:") and needle in err


def test_console_script_entry_point(ckpts):
    """`python -m apd_ext.cli` (what the `apd` console script calls) in a fresh process."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "apd_ext.cli", *_gen_args(ckpts, "--json")], capture_output=True,
                       text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["method"] == "apd"


def test_streamer_colours_each_step(ckpts):
    import io

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(ckpts / "dream"), local_files_only=True)
    buf = io.StringIO()
    s = cli._Streamer(tok, eos=[2], colour=True, stream=buf)
    blocks = [tok("ab", add_special_tokens=False)["input_ids"], tok("cde", add_special_tokens=False)["input_ids"],
              [2]]
    for i, b in enumerate(blocks):
        s.ids(i + 1, [b])
    out = buf.getvalue()
    assert out == cli._COLOURS[0] + "ab" + cli._RESET + cli._COLOURS[1] + "cde" + cli._RESET


def test_bench_writes_csv_and_plot(tmp_path, capsys):
    csv_path, png = tmp_path / "b.csv", tmp_path / "b.png"
    args = ["bench", "--device", "cpu", "--steps", "1", "--repeats", "1", "--max-new-tokens", "16",
            "--csv", str(csv_path), "--plot", str(png), "--markdown", str(tmp_path / "b.md")]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "apd-reference" in out and "ms/step" in out
    rows = csv_path.read_text().splitlines()
    assert rows[0].startswith("device,") and len(rows) == 1 + 2 * 4
    assert (tmp_path / "b.md").read_text().count("| apd |") == 2
    try:
        import matplotlib  # noqa: F401
        assert png.stat().st_size > 0
    except ImportError:
        assert "pip install 'apd-ext[plot]'" in out


def test_embedded_pair_wraps_a_bare_question(capsys):
    d_def, _ = cli._embedded_defaults()
    if d_def is None:
        pytest.skip("the embedded tiny pair is not installed")
    question = "Rosa has 12 apples. Zoe gives her 9 apples. She sells 5 apples. How many apples does Rosa have now?"
    rc = cli.main(["generate", "--prompt", question, "--max-new-tokens", "48", "--json"])
    assert rc == 0
    result = json.loads(capsys.readouterr().out)
    # Without the `Question: ...\nAnswer:\n` wrapper the tiny pair answers garbage.
    assert "#### 16" in result["text"]


# ----------------------------------------------------------------------------- defaults, extras

def test_one_set_of_defaults_for_the_embedded_pair(ckpts, capsys):
    """`apd generate` on the embedded pair takes apd_ext.tiny.DEFAULTS (as `apd demo`,
    the server and the README's snippets do); on other folders APDConfig's own."""
    d_def, _ = cli._embedded_defaults()
    if d_def is None:
        pytest.skip("the embedded tiny pair is not installed")
    from apd_ext import tiny
    from apd_ext.config import APDConfig
    from apd_ext.tiny import demo

    assert cli.main(["generate", "--prompt", "Ben has 20 cards. He sells 5 cards. How many cards does Ben have now?",
                     "--json"]) == 0
    apd = json.loads(capsys.readouterr().out)["config"]["apd"]
    assert {k: apd[k] for k in tiny.DEFAULTS} == tiny.DEFAULTS
    assert (demo.DEFAULT_R, demo.DEFAULT_W, demo.DEFAULT_M, demo.MAX_NEW) == \
        tuple(tiny.DEFAULTS[k] for k in ("R", "W", "M", "max_new_tokens"))
    assert {k: getattr(tiny.apd_config(), k) for k in tiny.DEFAULTS} == tiny.DEFAULTS
    # another pair: the generic defaults (APDConfig's), except the budget this test sets
    assert cli.main(_gen_args(ckpts, "--json")) == 0
    apd = json.loads(capsys.readouterr().out)["config"]["apd"]
    base = APDConfig()
    assert (apd["R"], apd["W"], apd["M"], apd["temperature"], apd["top_p"]) == \
        (base.R, base.W, base.M, base.temperature, base.top_p)
    assert cli.GENERIC_DEFAULTS == {k: getattr(base, k) for k in cli.GENERIC_DEFAULTS}
    # an explicit value wins, and --W none still means no dLLM KV cache
    assert cli.main(_gen_args(ckpts, "--json", "--W", "none", "--M", "7", "--temperature", "0")) == 0
    apd = json.loads(capsys.readouterr().out)["config"]["apd"]
    assert (apd["W"], apd["M"], apd["temperature"]) == (None, 7, 0.0)


@pytest.fixture
def without(monkeypatch):
    """Makes `import NAME` fail for the given top-level modules (as when an extra is missing)."""
    def hide(*names):
        for name in list(sys.modules):
            if name.split(".")[0] in names:
                monkeypatch.delitem(sys.modules, name)
        for name in names:
            monkeypatch.setitem(sys.modules, name, None)
    return hide


def test_serve_without_its_extra_is_one_line(without, capsys):
    without("ray")
    assert cli.main(["serve", "--port", "8765"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "apd: error: apd serve: serve needs ray, which is not installed: pip install 'apd-ext[serve]'"


def test_lm_eval_without_its_extra_is_one_line(without, capsys):
    without("lm_eval")
    assert cli.lm_eval_main() == 2
    assert capsys.readouterr().err.strip().endswith("pip install 'apd-ext[eval]'")
    # `python -m apd_ext.integrations.lm_eval`, the README's command, in a process without lm_eval
    code = ("import sys, runpy; sys.modules['lm_eval'] = None; "
            "runpy.run_module('apd_ext.integrations.lm_eval', run_name='__main__')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().splitlines()[-1].endswith("pip install 'apd-ext[eval]'") and \
        len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_plot_without_its_extra_names_it(without):
    without("matplotlib")
    assert cli.missing_extra("plot") == "plot needs matplotlib, which is not installed: pip install 'apd-ext[plot]'"


@pytest.fixture(scope="module", params=["byte", "qwen"])
def pair_dirs(request, ckpts, tmp_path_factory):
    """(dllm, verifier) folders: the byte-level tiny checkpoints above, or the
    random tiny pair at the real Qwen vocabulary (CJK / emoji split across tokens)."""
    if request.param == "byte":
        return str(ckpts / "dream"), str(ckpts / "qwen")
    from tests.qwen_vocab import write_real_vocab_pair
    return write_real_vocab_pair(tmp_path_factory.mktemp("qv"))


@pytest.mark.parametrize("prompt", ["你好，世界。", "emoji 🙂👍🏽 ok"])
def test_streamed_text_equals_the_json_text(pair_dirs, capsys, prompt):
    """`apd generate` streams through the incremental detokenizer: what it
    prints equals --json's text (the full decode), with no character printed
    twice when a step ends mid-character."""
    args = ["generate", "--dllm", pair_dirs[0], "--verifier", pair_dirs[1], "--prompt", prompt,
            "--max-new-tokens", "24", "--device", "cpu", "--temperature", "1.0", "--top-p", "1.0", "--seed", "7",
            "--W", "4", "--M", "8"]
    assert cli.main(args + ["--json"]) == 0
    want = json.loads(capsys.readouterr().out)["text"]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert out.rsplit("\n--- apd: ", 1)[0] == want


def test_streamer_holds_a_split_character_back():
    import io

    from tests.qwen_vocab import dream_tokenizer

    tok = dream_tokenizer()
    emoji = next(c for c in "🫠🪼🦩🧌𓀀" if len(tok(c, add_special_tokens=False)["input_ids"]) >= 2)
    ids = tok(emoji, add_special_tokens=False)["input_ids"]  # its 4 UTF-8 bytes span several byte tokens
    buf = io.StringIO()
    s = cli._Streamer(tok, eos=[151643], colour=False, stream=buf)
    s.ids(1, [ids[:1]])
    assert buf.getvalue() == ""  # half a character: nothing yet
    s.ids(2, [ids[1:] + tok(" ok", add_special_tokens=False)["input_ids"]])
    s.finish()
    assert buf.getvalue() == emoji + " ok"


def test_chat_on_the_embedded_pair(capsys):
    """The embedded pair's chat template frames the message as the task's
    prompt, so --chat gives the same answer as the bare question."""
    d_def, _ = cli._embedded_defaults()
    if d_def is None:
        pytest.skip("the embedded tiny pair is not installed")
    question = "Rosa has 12 apples. Zoe gives her 9 apples. She sells 5 apples. How many apples does Rosa have now?"
    assert cli.main(["generate", "--prompt", question, "--max-new-tokens", "48", "--json", "--chat"]) == 0
    chat = json.loads(capsys.readouterr().out)
    assert cli.main(["generate", "--prompt", question, "--max-new-tokens", "48", "--json"]) == 0
    bare = json.loads(capsys.readouterr().out)
    assert chat["token_ids"] == bare["token_ids"] and "#### 16" in chat["text"]


def test_tiny_export_keeps_the_chat_template(tmp_path):
    """A retrain (tiny/train.py's tokenizer export) writes the shipped template."""
    from apd_ext import tiny
    from apd_ext.tiny.train import CHAT_TEMPLATE, write_tokenizer_configs

    write_tokenizer_configs(tmp_path)
    for d in [tmp_path, *tiny.paths()]:
        assert json.loads((d / "tokenizer_config.json").read_text())["chat_template"] == CHAT_TEMPLATE
