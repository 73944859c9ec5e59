"""The pair checker (python/apd_ext/pairs.py, `apd check-pair`) on the real
Qwen vocabulary (tests/qwen_vocab.py): Dream + Qwen2.5 compatible, Dream +
Qwen3 compatible with 151665-151668 banned, a pair whose tokenizers differ
incompatible; and APD end to end with a Qwen3 verifier."""
import json
import os

import pytest
import torch

import apd_ext
from apd_ext import pairs
from model_utils import make_tiny_qwen3
from qwen_vocab import QWEN25_VOCAB, qwen3_tokenizer, write_real_vocab_pair

# Qwen3's chat template, shortened to the no-tools, no-thinking branch: unlike
# Qwen2.5's (and Dream's) it adds no default system prompt.
QWEN3_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def write_qwen3_folder(path):
    """A random tiny Qwen3 (V = 151936, Qwen3ForCausalLM's own save_pretrained)
    with Qwen3's real tokenizer; EOS as Qwen3-Instruct: config 151645 (<|im_end|>),
    generation_config [151645, 151643]."""
    tok = qwen3_tokenizer()
    tok.chat_template = QWEN3_CHAT_TEMPLATE
    make_tiny_qwen3(path, vocab=QWEN25_VOCAB, hidden=32, layers=1, heads=2, kv_heads=1, head_dim=16,
                    intermediate=64, eos_token_id=151645, bos_token_id=None, pad_token_id=151643, seed=3)
    with open(os.path.join(path, "generation_config.json"), "w") as f:
        json.dump({"eos_token_id": [151645, 151643], "pad_token_id": 151643}, f)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    pytest.importorskip("transformers")
    root = tmp_path_factory.mktemp("pairs")
    dllm, qwen25 = write_real_vocab_pair(root)
    qwen3 = write_qwen3_folder(root / "qwen3")
    return dllm, qwen25, qwen3


@pytest.fixture(scope="module")
def other_tokenizer_folder(tmp_path_factory):
    """A verifier whose tokenizer is not Qwen's: a word-level vocabulary of 1000
    made-up words (ids 0..999 mean other strings than Qwen's BPE ranks)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from model_utils import make_tiny_qwen2

    path = tmp_path_factory.mktemp("other")
    vocab = {f"w{i}": i for i in range(999)} | {"<eos>": 999}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<eos>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>").save_pretrained(path)
    make_tiny_qwen2(path, vocab=1000, hidden=32, layers=1, heads=2, kv_heads=1, eos_token_id=999,
                    bos_token_id=None, pad_token_id=999)
    return str(path)


def test_dream_qwen25_is_compatible(folders):
    dllm, qwen25, _ = folders
    r = apd_ext.check_pair(dllm, qwen25)
    assert r.verdict == pairs.COMPATIBLE and r.banned is None and r.compatible and not r.reasons
    assert r.shared == (0, 151665) and r.collisions == []
    assert r.only_dllm == [(151665, 151667)] and r.only_verifier == []  # <|beginoftext|>, <|mask|>
    assert (r.mask_id, r.mask_token) == (151666, "<|mask|>")
    assert r.eos_dllm == [151643] and r.eos_verifier == [151643]
    assert r.chat_template.startswith("same ids")


def test_dream_qwen3_is_compatible_with_151665_to_151668_banned(folders):
    dllm, _, qwen3 = folders
    r = apd_ext.check_pair(dllm, qwen3)
    assert r.verdict == pairs.BANNED and r.banned == (151665, 151669) and r.compatible
    assert r.collisions == [(151665, "<|beginoftext|>", "<tool_response>"),
                            (151666, "<|mask|>", "</tool_response>")]
    assert r.only_verifier == [(151667, 151669)] and r.only_dllm == []  # <think>, </think>
    assert r.shared == (0, 151665)
    assert r.eos_verifier == [151645, 151643] and r.eos_dllm == [151643]
    assert r.chat_template.startswith("differ")  # Qwen3 adds no default system prompt
    text = r.format()
    assert "verdict:   compatible with banned ids: [151665, 151666, 151667, 151668]" in text
    assert "151666: dLLM '<|mask|>' vs verifier '</tool_response>'" in text
    assert apd_ext.check_pair(dllm, qwen3) is r  # cached per folder pair


def test_different_tokenizers_are_incompatible(folders, other_tokenizer_folder):
    dllm = folders[0]
    r = apd_ext.check_pair(dllm, other_tokenizer_folder)
    assert r.verdict == pairs.INCOMPATIBLE and r.banned is None and not r.compatible
    assert r.shared == (0, 0)
    assert any(x.startswith("the tokenizers differ: 999 regular") for x in r.reasons), r.reasons
    assert any("EOS sets share no id" in x for x in r.reasons), r.reasons
    with pytest.raises(ValueError, match="incompatible: the tokenizers differ"):
        r.raise_if_incompatible()


def test_check_pair_cli(folders, other_tokenizer_folder, capsys):
    from apd_ext import cli

    dllm, _, qwen3 = folders
    assert cli.main(["check-pair", dllm, qwen3]) == 0
    out = capsys.readouterr().out
    assert out == apd_ext.check_pair(dllm, qwen3).format() + "\n"
    assert "collisions (same id, different tokens): 2" in out and "verifier only: 151667-151668" in out
    assert cli.main(["check-pair", dllm, other_tokenizer_folder]) == 1
    assert "verdict:   incompatible" in capsys.readouterr().out
    assert cli.main(["check-pair", "/nonexistent/folder", qwen3]) == 2
    assert capsys.readouterr().err.startswith("apd: error: dllm: checkpoint folder")
    assert cli.main(["check-pair", qwen3, dllm]) == 2  # swapped: the first must be the dLLM
    assert "dllm: expected a model of kind 'dllm'" in capsys.readouterr().err


def test_check_pair_argument_errors(folders, tmp_path):
    dllm, qwen25, _ = folders
    with pytest.raises(TypeError, match="^verifier: expected a checkpoint folder path"):
        apd_ext.check_pair(dllm, 3)
    (tmp_path / "config.json").write_text((open(os.path.join(qwen25, "config.json")).read()))
    with pytest.raises(ValueError, match="^verifier: .* has no tokenizer"):
        apd_ext.check_pair(dllm, tmp_path)


# ------------------------------------------------------------- APD with Qwen3
PROMPTS = [[(7 * i + 11 + 13 * k) % 500 + 3 for i in range(n)] for k, n in enumerate((19, 3, 11, 1))]
SEEDS = [3, 11, 5, 3]


def _assert_batch_equals_alone(dllm, verifier, **kw):
    out = apd_ext.generate(dllm, verifier, PROMPTS, seeds=SEEDS, **kw)
    for b, (p, s) in enumerate(zip(PROMPTS, SEEDS)):
        alone = apd_ext.generate(dllm, verifier, [p], seeds=[s], **kw)
        assert out.generated(b).tolist() == alone.generated(0).tolist(), f"sequence {b}"
        assert out.accepted_per_step[b] == alone.accepted_per_step[0], f"sequence {b}"
    return out


@pytest.mark.parametrize("tie,head_dim", [(False, 24), (True, 16)])
def test_apd_with_a_qwen3_verifier_is_batch_invariant(tmp_path, tie, head_dim):
    from model_utils import make_tiny_dream

    make_tiny_dream(tmp_path / "dream", seed=0, mask_token_id=508)
    make_tiny_qwen3(tmp_path / "qwen3", seed=1, tie=tie, head_dim=head_dim)
    dllm, verifier = apd_ext.load_model(tmp_path / "dream"), apd_ext.load_model(tmp_path / "qwen3")
    assert verifier.config.qk_norm and verifier.config.model_type == "qwen3"
    for tau in (0.0, 0.7):
        out = _assert_batch_equals_alone(dllm, verifier, R=0.7, W=8, M=16, temperature=tau, top_p=0.95,
                                         max_new_tokens=16, eos_token_ids=[])
        assert out.num_generated.tolist() == [16] * len(PROMPTS)
        assert out.stats.steps < 16 * len(PROMPTS)  # APD: several tokens per step somewhere
    # R = 1 accepts every draft: a Qwen3 verifier changes nothing then (the dLLM alone decides).
    a = apd_ext.generate(dllm, verifier, PROMPTS[:1], seeds=SEEDS[:1], R=1.0, W=8, M=16, temperature=0.7,
                         max_new_tokens=16, eos_token_ids=[])
    assert a.stats.steps < 16


def _favour_banned(model, monkeypatch):
    """Both models' logits raised by 30 at 151665..151668: without the ban they win."""
    forward = model.forward

    def biased(*args, **kw):
        out = forward(*args, **kw).clone()
        out[..., 151665:151669] += 30.0
        return out

    monkeypatch.setattr(model, "forward", biased)


def test_apd_dream_qwen3_never_drafts_or_accepts_banned_ids(folders, monkeypatch):
    dllm_dir, _, qwen3_dir = folders
    dllm, verifier = apd_ext.load_model(dllm_dir), apd_ext.load_model(qwen3_dir)
    _favour_banned(dllm, monkeypatch)
    _favour_banned(verifier, monkeypatch)
    kw = dict(R=0.7, W=4, M=8, temperature=0.7, top_p=0.95, max_new_tokens=8, eos_token_ids=[])
    eng = apd_ext.Engine(dllm, verifier)
    assert eng.banned == (151665, 151669)  # the Engine's pair check at load
    out = _assert_batch_equals_alone(dllm, verifier, **kw)
    ids = torch.cat([out.generated(b) for b in range(len(PROMPTS))])
    assert ids.numel() == 8 * len(PROMPTS) and not ((ids >= 151665) & (ids < 151669)).any()
    # The same run without the ban: the raised ids are drafted and accepted.
    monkeypatch.setattr(pairs, "banned_for_models", lambda d, v: None)
    free = apd_ext.generate(dllm, verifier, PROMPTS, seeds=SEEDS, **kw)
    ids = torch.cat([free.generated(b) for b in range(len(PROMPTS))])
    assert ((ids >= 151665) & (ids < 151669)).float().mean() > 0.5
