"""Issue 13, "the first hour": every bad input a new user hit ends in ONE clear
error line (exit status 2) naming the argument, never a traceback, a hang or a
silent wrong result. Runs the embedded tiny pair in-process (fast)."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import apd_ext
from apd_ext import cli
from apd_ext.tiny import paths, unknown_words
from tests.model_utils import make_tiny_qwen2

QUESTION = "Ava has 12 apples. She buys 3 more apples. How many apples does Ava have now?"


def _one_error(capsys, needle: str) -> str:
    err = capsys.readouterr().err
    lines = [l for l in err.splitlines() if l.strip()]
    errors = [l for l in lines if l.startswith("apd: error:")]
    assert len(errors) == 1, err
    assert "Traceback" not in err and needle in errors[0], err
    return errors[0]


def _argparse_error(capsys, argv, needle: str) -> str:
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert "Traceback" not in err and needle in last, err
    return last


@pytest.fixture(scope="module")
def corrupt_dllm(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corrupt") / "dllm"
    shutil.copytree(paths()[0], folder)
    f = folder / "model.safetensors"
    f.write_bytes(f.read_bytes()[: 100_000])  # truncated mid-tensor
    return folder


def test_truncated_safetensors_names_the_file(corrupt_dllm, capsys):
    assert cli.main(["generate", "--dllm", str(corrupt_dllm), "--prompt", QUESTION, "--device", "cpu"]) == 2
    line = _one_error(capsys, str(corrupt_dllm / "model.safetensors"))
    assert "corrupt" in line


def test_corrupt_header_names_the_file_in_the_library(tmp_path):
    folder = tmp_path / "dllm"
    shutil.copytree(paths()[0], folder)
    (folder / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(ValueError, match="model.safetensors: not a readable safetensors file"):
        apd_ext.load_model(str(folder))


def test_missing_folder_says_only_local_folders_load(capsys):
    assert cli.main(["generate", "--dllm", "Dream-org/Dream-v0-Instruct-7B", "--prompt", "hi"]) == 2
    _one_error(capsys, "only local folders load")
    with pytest.raises(FileNotFoundError, match="only local checkpoint folders load"):
        apd_ext.load_model("Qwen/Qwen2.5-0.5B")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the GPU-less message")
@pytest.mark.parametrize("argv", [["demo", "--device", "cuda"],
                                  ["generate", "--device", "cuda", "--prompt", QUESTION]])
def test_device_cuda_without_a_gpu(capsys, argv):
    assert cli.main(argv) == 2
    _one_error(capsys, "no CUDA device")


def test_diffusion_steps_zero_is_refused(capsys):
    _argparse_error(capsys, ["generate", "--method", "diffusion", "--steps", "0", "--prompt", QUESTION],
                    "--steps: expected an int >= 1, got 0")


def test_diffusion_steps_are_honoured(capsys):
    # --steps 2 (not the 8 of --max-new-tokens) full forwards: the old `steps or max_new` ran 256 for 0.
    assert cli.main(["generate", "--method", "diffusion", "--steps", "2", "--max-new-tokens", "8",
                     "--prompt", QUESTION, "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["stats"]["dllm_forwards"] == 2


@pytest.mark.parametrize("prompt", ["", "   ", "\n"])
def test_empty_prompt(capsys, prompt):
    assert cli.main(["generate", "--prompt", prompt]) == 2
    _one_error(capsys, "--prompt")


def test_context_overflow_needs_truncate(capsys):
    # The embedded pair has 512 positions; 600 new tokens cannot fit after any prompt.
    assert cli.main(["generate", "--prompt", QUESTION, "--max-new-tokens", "600"]) == 2
    line = _one_error(capsys, "--max-new-tokens")
    assert "--truncate" in line and "512" in line


def test_context_overflow_with_truncate_warns(capsys):
    assert cli.main(["generate", "--prompt", QUESTION, "--max-new-tokens", "600", "--truncate", "--json"]) == 0
    cap = capsys.readouterr()
    res = json.loads(cap.out)
    room = 512 - res["prompt_tokens"]
    assert f"at most {room} new tokens fit" in cap.err and "warning" in cap.err
    assert 1 <= res["num_generated"] <= room


def test_pair_with_different_tokenizers_blames_the_pair(tmp_path, capsys):
    # A verifier whose vocabulary (500) is smaller than the ids the dLLM's
    # tokenizer produces (the tiny tokenizer has 568): the pair is at fault.
    make_tiny_qwen2(tmp_path / "v500", vocab=500, eos_token_id=0, bos_token_id=0, pad_token_id=1, seed=3)
    assert cli.main(["generate", "--verifier", str(tmp_path / "v500"), "--prompt", QUESTION]) == 2
    line = _one_error(capsys, "--dllm / --verifier")
    assert "does not share a tokenizer" in line and "input_ids" not in line


def test_bad_window_names_the_flag_not_the_function(capsys):
    last = _argparse_error(capsys, ["generate", "--W", "abc", "--prompt", QUESTION], "argument --W")
    assert "_w_arg" not in last and "'abc'" in last
    last = _argparse_error(capsys, ["demo", "--W", "abc"], "argument --W")
    assert "_w_arg" not in last


def test_out_of_vocabulary_words_warn(capsys):
    assert unknown_words(QUESTION) == []
    assert unknown_words("What is the capital of France? Ava has 70 apples") == \
        ["What", "is", "the", "capital", "of", "France", "70"]
    assert cli.main(["generate", "--prompt", "Ava has 3 dogs.", "--max-new-tokens", "4", "--json"]) == 0
    err = capsys.readouterr().err
    assert "outside its training vocabulary" in err and "dogs" in err


def test_help_lists_the_tiny_vocabulary(capsys):
    with pytest.raises(SystemExit):
        cli.main(["demo", "--help"])
    out = capsys.readouterr().out
    for word in ("Ava", "Omar", "Zoe", "apples", "shirts", "triples", "splits"):
        assert word in out


def test_tokenizer_loads_silently():
    """No transformers warning (Dream model type, rope_scaling) on load, in a fresh process."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONWARNINGS="default")
    code = "import apd_ext.tiny as t; tok = t.tokenizer(); print(tok.eos_token_id, tok.mask_token_id, len(tok))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["0", "2", "568"]
    assert r.stderr.strip() == "", r.stderr


def test_library_warns_when_the_context_cuts_the_budget():
    """apd_ext.generate itself: no silent cut of max_new_tokens at the context."""
    from apd_ext.tiny import tokenizer

    d, a = paths()
    dllm, ver = apd_ext.load_model(str(d), dtype=torch.float32), apd_ext.load_model(str(a), dtype=torch.float32)
    ids = tokenizer()(QUESTION, return_tensors="pt", add_special_tokens=False).input_ids  # [1, L]
    with pytest.warns(UserWarning, match=r"leaves room for \d+ of the max_new_tokens=600"):
        apd_ext.generate(dllm, ver, ids, R=0.7, W=16, M=8, max_new_tokens=600, seed=0, temperature=0.0)


def test_library_pair_with_different_tokenizers_blames_the_pair(tmp_path):
    # The same mismatch through the Python API: apd_ext.generate names the pair,
    # not input_ids (ids < 500 still run; the verifier cannot embed 500 .. 567).
    import torch

    import apd_ext

    make_tiny_qwen2(tmp_path / "v500", vocab=500, eos_token_id=0, bos_token_id=0, pad_token_id=1, seed=3)
    dllm_dir, _ = apd_ext.tiny.paths()
    dllm = apd_ext.load_model(str(dllm_dir), dtype=torch.float32)
    verifier = apd_ext.load_model(str(tmp_path / "v500"))
    with pytest.raises(ValueError, match=r"dllm / verifier: the prompt's token id 560 is in the dLLM's "
                                         r"vocabulary \(568\) but not in the verifier's \(500\)"):
        apd_ext.generate(dllm, verifier, [torch.tensor([3, 560, 7])], max_new_tokens=4)
    with pytest.raises(ValueError, match=r"input_ids: expected token ids in \[0, 500\)"):
        apd_ext.generate(dllm, verifier, [torch.tensor([3, 600])], max_new_tokens=4)  # outside both
    engine = apd_ext.Engine(dllm, verifier, max_batch=1)
    with pytest.raises(ValueError, match=r"dllm / verifier: the prompt's token id 560"):
        engine.add_request([3, 560, 7], None, request_id="r")


# ------------------------------------------------ issue 26 items 5 and 10
# A device that is not present: cuda:99 is absent on every machine (a GPU-less
# one says so; a GPU one counts its devices), plain cuda only where torch sees none.
_ABSENT = ["cuda:99"] + ([] if torch.cuda.is_available() else ["cuda"])
_IDS = ["index_99", "no_gpu"]  # not "cuda": conftest skips tests with that keyword on a GPU-less machine


@pytest.mark.parametrize("device", _ABSENT, ids=_IDS[: len(_ABSENT)])
@pytest.mark.parametrize("argv", [["generate", "--prompt", QUESTION], ["demo"], ["sweep", "--limit", "1"],
                                  ["bench"], ["serve"]], ids=lambda a: a[0])
def test_every_command_names_an_absent_device(capsys, argv, device):
    assert cli.main(argv + ["--device", device]) == 2
    _one_error(capsys, f"--device: '{device}' is not present here")


@pytest.mark.parametrize("device", _ABSENT, ids=_IDS[: len(_ABSENT)])
def test_load_model_names_an_absent_device(device):
    with pytest.raises(ValueError, match=rf"^device: '{device}' is not present here"):
        apd_ext.load_model(paths()[0], device=device)


def test_load_model_device_auto_and_bad_names():
    model = apd_ext.load_model(paths()[0], device="auto")
    assert model.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match=r"^device: expected 'cpu', 'cuda', 'cuda:N' or 'auto', got 'gpu0'"):
        apd_ext.load_model(paths()[0], device="gpu0")
    with pytest.raises(ValueError, match=r"^device: expected .* \(the kernels run on the CPU and CUDA only\)"):
        apd_ext.load_model(paths()[0], device="meta")


@pytest.fixture
def weights_only(tmp_path):
    """A folder holding only the safetensors (no config.json, no tokenizer)."""
    folder = tmp_path / "weights_only"
    folder.mkdir()
    shutil.copy(paths()[0] / "model.safetensors", folder / "model.safetensors")
    return folder


@pytest.mark.parametrize("flag", ["--dllm", "--verifier"])
def test_folder_without_config_json_says_so_first(capsys, weights_only, flag):
    assert cli.main(["generate", flag, str(weights_only), "--prompt", QUESTION, "--device", "cpu"]) == 2
    line = _one_error(capsys, f"{flag}: no config.json in {weights_only}")
    assert "tokenizer" not in line
    with pytest.raises(FileNotFoundError, match="^src: no config.json in"):
        apd_ext.load_model(weights_only)


@pytest.mark.parametrize("argv", [["generate", "--prompt", QUESTION, "--device", "cpu"], ["demo"], ["serve"],
                                  ["sweep", "--limit", "1"]], ids=lambda a: a[0])
def test_a_file_where_a_folder_is_expected(capsys, argv):
    f = str(paths()[0] / "model.safetensors")
    assert cli.main(argv + ["--dllm", f]) == 2
    _one_error(capsys, f"--dllm: '{f}' is a file, expected a checkpoint folder")
    with pytest.raises(NotADirectoryError, match="^src: .* is a file, expected a checkpoint folder"):
        apd_ext.load_model(f)
