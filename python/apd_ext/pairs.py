"""check_pair: can this dLLM drafter and this AR verifier run one APD loop,
and which ids must be banned for it? (DESIGN.md §4 "Banned ids")

    report = apd_ext.check_pair("Dream-v0-Instruct-7B", "Qwen3-0.6B")
    print(report.format())          # what `apd check-pair DLLM VERIFIER` prints
    report.banned                   # None or (start, end): ids [start, end) banned

APD compares ids drafted by one model with ids scored by the other, so every
id either model can produce must mean the same token in both. The report
reads both folders' config.json / generation_config.json and tokenizers:

- the shared range [0, n): the longest prefix of ids both tokenizers define
  as the same token (Qwen's 151,643 BPE ranks and its first specials);
- collisions: ids that both define as DIFFERENT tokens. Among added/special
  tokens (Qwen3's <tool_response> / </tool_response> at 151665-151666 against
  Dream's <|beginoftext|> / <|mask|>) they are banned: never drafted, never
  accepted (the kernels read them as logit -inf). A collision among the
  regular vocabulary means the tokenizers differ: incompatible;
- ids that exist in one tokenizer only. The dLLM's own specials (Dream's
  <|mask|> against Qwen2.5) sit on a padding row of the verifier, which never
  makes them a target: left alone, as V_D vs V_A (SEMANTICS.md). The
  verifier's own specials below min(V_D, V_A) (Qwen3's <think> / </think> at
  151667-151668) are tokens the verifier does produce, on an untrained row of
  the dLLM whose text the dLLM cannot read back: banned too;
- the EOS sets (they must share an id and none may be banned), the mask id,
  and whether both chat templates render a sample conversation to the same
  ids (a difference is reported, not fatal: prompts are rendered with the
  dLLM's template).

The kernels ban one contiguous range of ids (exact, one compare per entry), so
a collision set that is not contiguous is reported incompatible.

Fast at V = 152k: each tokenizer's vocabulary becomes one id -> token array and
the comparison is one vectorised equality; reports are cached per pair of
folders (keyed by the files' modification times), so generate, the Engine
and `apd serve` re-check at load for free. check_compatible (models/compat.py)
stays the cheap config-only check for live models without tokenizers.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional

from apd_ext.models.config import parse_config, read_folder_config

# No system turn: Qwen2.5's and Dream's templates then add their default system
# prompt and Qwen3's adds none, a difference this check must see.
SAMPLE_CONVERSATION = [{"role": "user", "content": "What is 12 times 7?"}]

COMPATIBLE = "compatible"
BANNED = "compatible with banned ids"
INCOMPATIBLE = "incompatible"

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json")


@dataclass(frozen=True)
class PairReport:
    dllm: str
    verifier: str
    vocab_dllm: int  # config vocab_size (model rows)
    vocab_verifier: int
    tokens_dllm: int  # tokenizer ids defined
    tokens_verifier: int
    shared: tuple  # (0, n): ids [0, n) are the same token in both
    only_dllm: list  # [(start, end)] ids only the dLLM's tokenizer defines
    only_verifier: list  # [(start, end)]
    collisions: list  # [(id, dllm token, verifier token)]
    eos_dllm: list
    eos_verifier: list
    mask_id: Optional[int]
    mask_token: Optional[str]
    chat_template: str  # "same ids", "differ: ...", or "not checked: ..."
    verdict: str  # COMPATIBLE, BANNED or INCOMPATIBLE
    banned: Optional[tuple]  # (start, end) when verdict == BANNED
    reasons: list = field(default_factory=list)

    @property
    def compatible(self) -> bool:
        return self.verdict != INCOMPATIBLE

    def raise_if_incompatible(self) -> None:
        if not self.compatible:
            raise ValueError(f"the pair {self.dllm} + {self.verifier} is incompatible: " + "; ".join(self.reasons))

    def format(self) -> str:
        def ranges(rs):
            return ", ".join(f"{a}-{b - 1}" if b - a > 1 else f"{a}" for a, b in rs) or "none"

        lines = [
            f"dLLM:      {self.dllm} (vocab {self.vocab_dllm}, tokenizer ids {self.tokens_dllm})",
            f"verifier:  {self.verifier} (vocab {self.vocab_verifier}, tokenizer ids {self.tokens_verifier})",
            f"shared:    ids {self.shared[0]}-{self.shared[1] - 1} are the same token in both",
            f"dLLM only: {ranges(self.only_dllm)}",
            f"verifier only: {ranges(self.only_verifier)}",
            f"collisions (same id, different tokens): {len(self.collisions)}",
        ]
        lines += [f"  {i}: dLLM {td!r} vs verifier {ta!r}" for i, td, ta in self.collisions[:12]]
        if len(self.collisions) > 12:
            lines.append(f"  ... {len(self.collisions) - 12} more")
        lines += [
            f"EOS:       dLLM {self.eos_dllm}, verifier {self.eos_verifier}",
            f"mask id:   {self.mask_id} ({self.mask_token!r})",
            f"chat template: {self.chat_template}",
        ]
        if self.verdict == BANNED:
            a, b = self.banned
            lines.append(f"verdict:   {BANNED}: {list(range(a, b))} (never drafted, never accepted)")
        else:
            lines.append(f"verdict:   {self.verdict}")
        lines += [f"  - {r}" for r in self.reasons]
        return "\n".join(lines)


def _runs(ids) -> list:
    """Sorted ints -> [(start, end)] maximal runs of consecutive ids."""
    out = []
    for i in ids:
        if out and out[-1][1] == i:
            out[-1][1] = i + 1
        else:
            out.append([i, i + 1])
    return [tuple(r) for r in out]


def _id_array(vocab: dict):
    """token -> id dict -> numpy object array [max id + 1] of tokens (None where undefined)."""
    import numpy as np

    n = max(vocab.values(), default=-1) + 1
    arr = np.full(n, None, dtype=object)
    arr[np.fromiter(vocab.values(), dtype=np.int64, count=len(vocab))] = list(vocab.keys())
    return arr


def _load_tokenizer(folder: str, who: str):
    if not any(os.path.isfile(os.path.join(folder, f)) for f in _TOKENIZER_FILES):
        raise ValueError(f"{who}: {folder} has no tokenizer (tokenizer.json / tokenizer_config.json)")
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    # With a tokenizer.json the fast class reads it directly: AutoTokenizer would
    # also read config.json and warn about model types it does not know (Dream).
    cls = PreTrainedTokenizerFast if os.path.isfile(os.path.join(folder, "tokenizer.json")) else AutoTokenizer
    try:
        return cls.from_pretrained(folder, local_files_only=True)
    except Exception as e:  # noqa: BLE001  (transformers raises many types here)
        raise ValueError(f"{who}: {folder}: no usable tokenizer: {e}") from None


def _render(tok) -> Optional[list]:
    if not getattr(tok, "chat_template", None):
        return None
    ids = tok.apply_chat_template(SAMPLE_CONVERSATION, add_generation_prompt=True, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "keys"):
        ids = ids["input_ids"]
    return list(ids)


def compare(dllm_name, verifier_name, cd, ca, tok_d, tok_a) -> PairReport:
    """The report for two parsed configs (ModelConfig) and two tokenizers."""
    import numpy as np

    td, ta = _id_array(tok_d.get_vocab()), _id_array(tok_a.get_vocab())
    n = min(len(td), len(ta))
    both = np.not_equal(td[:n], None) & np.not_equal(ta[:n], None)
    same = both & (td[:n] == ta[:n])
    differ = np.flatnonzero(both & ~same)
    first_bad = np.flatnonzero(~same)
    shared_end = int(first_bad[0]) if len(first_bad) else n
    only_d = np.flatnonzero(np.not_equal(td, None) & ~np.concatenate([both, np.zeros(len(td) - n, bool)]))
    only_a = np.flatnonzero(np.not_equal(ta, None) & ~np.concatenate([both, np.zeros(len(ta) - n, bool)]))
    collisions = [(int(i), td[i], ta[i]) for i in differ]

    reasons = []
    special = set(tok_d.get_added_vocab().values()) | set(tok_a.get_added_vocab().values())
    special |= set(getattr(tok_d, "all_special_ids", [])) | set(getattr(tok_a, "all_special_ids", []))
    regular = [i for i, _, _ in collisions if i not in special]
    vd, va = cd.vocab_size, ca.vocab_size
    a_only = [int(i) for i in only_a if i < min(vd, va)]  # verifier ids the dLLM has a row for
    a_only_regular = [i for i in a_only if i not in special]
    banned = None
    if regular:
        i = regular[0]
        reasons.append(f"the tokenizers differ: {len(regular)} regular (non-special) ids map to different "
                       f"tokens, first id {i}: dLLM {td[i]!r} vs verifier {ta[i]!r}")
    elif a_only_regular:
        i = a_only_regular[0]
        reasons.append(f"the tokenizers differ: {len(a_only_regular)} regular verifier ids are missing from the "
                       f"dLLM's tokenizer, first id {i} ({ta[i]!r})")
    else:
        ids = sorted({i for i, _, _ in collisions} | set(a_only))
        runs = _runs(ids)
        if len(runs) > 1:
            reasons.append(f"the ids to ban {ids} are not one contiguous range "
                           f"(the kernels ban one range [start, end))")
        elif runs:
            banned = runs[0]
    for who, t, v in (("dLLM", td, vd), ("verifier", ta, va)):
        if len(t) > v:
            reasons.append(f"the {who}'s tokenizer defines id {len(t) - 1}, past its model's vocabulary of {v}")
    eos_d, eos_a = list(cd.eos_token_ids), list(ca.eos_token_ids)
    if eos_d and eos_a and not set(eos_d) & set(eos_a):
        reasons.append(f"the EOS sets share no id: dLLM {eos_d}, verifier {eos_a}")
    if banned is not None:
        hit = [e for e in eos_d + eos_a if banned[0] <= e < banned[1]]
        if hit:
            reasons.append(f"EOS id {hit[0]} would be banned (it means different tokens in the two tokenizers)")
    mask = cd.mask_token_id
    mask_token = td[mask] if mask is not None and 0 <= mask < len(td) else None
    if mask is None:
        reasons.append("the dLLM has no mask_token_id")
    elif mask_token is None:
        reasons.append(f"the dLLM's mask_token_id {mask} is not a token of its tokenizer")
    elif mask in eos_a:
        reasons.append(f"the dLLM's mask_token_id {mask} is an EOS id of the verifier")

    rd, ra = _render(tok_d), _render(tok_a)
    if rd is None or ra is None:
        chat = "not checked: " + ("the dLLM's" if rd is None else "the verifier's") + " tokenizer has no chat template"
    elif rd == ra:
        chat = f"same ids ({len(rd)} tokens for the sample conversation)"
    else:
        k = next((j for j, (x, y) in enumerate(zip(rd, ra)) if x != y), min(len(rd), len(ra)))
        chat = (f"differ: {len(rd)} vs {len(ra)} ids, first difference at position {k} "
                f"(prompts are rendered with the dLLM's template)")

    if reasons:
        verdict, banned = INCOMPATIBLE, None
    else:
        verdict = BANNED if banned is not None else COMPATIBLE
    return PairReport(
        dllm=dllm_name, verifier=verifier_name, vocab_dllm=vd, vocab_verifier=va, tokens_dllm=len(td),
        tokens_verifier=len(ta), shared=(0, shared_end), only_dllm=_runs(only_d.tolist()),
        only_verifier=_runs(only_a.tolist()), collisions=collisions, eos_dllm=eos_d, eos_verifier=eos_a,
        mask_id=mask, mask_token=mask_token, chat_template=chat, verdict=verdict, banned=banned,
        reasons=reasons,
    )


_CACHE: dict = {}


def _stamp(folder: str) -> tuple:
    names = ("config.json", "generation_config.json") + _TOKENIZER_FILES + ("special_tokens_map.json",)
    out = []
    for f in names:
        p = os.path.join(folder, f)
        out.append(os.stat(p).st_mtime_ns if os.path.isfile(p) else None)
    return tuple(out)


def check_pair(dllm, verifier) -> PairReport:
    """The pair report of two checkpoint folders (str / PathLike): the dLLM
    (kind "dllm") and the AR verifier. Raises ValueError naming the argument
    when a folder, config or tokenizer cannot be read; an incompatible pair is
    a report with verdict "incompatible" (report.raise_if_incompatible())."""
    folders = []
    for who, src in (("dllm", dllm), ("verifier", verifier)):
        if not isinstance(src, (str, os.PathLike)):
            raise TypeError(f"{who}: expected a checkpoint folder path, got {type(src).__name__}")
        folder = os.path.realpath(os.fspath(src))
        if not os.path.isdir(folder):
            raise ValueError(f"{who}: checkpoint folder {os.fspath(src)!r} not found")
        folders.append(folder)
    key = tuple(folders) + _stamp(folders[0]) + _stamp(folders[1])
    if key in _CACHE:
        return _CACHE[key]
    parsed = []
    for who, folder, want in (("dllm", folders[0], "dllm"), ("verifier", folders[1], "ar")):
        cfg, gen = read_folder_config(folder)
        kind, c = parse_config(cfg, gen, where=os.path.join(folder, "config.json"))
        if kind != want:
            raise ValueError(f"{who}: expected a model of kind {want!r}, {folder} holds kind {kind!r}")
        parsed.append(c)
    tok_d = _load_tokenizer(folders[0], "dllm")
    tok_a = _load_tokenizer(folders[1], "verifier")
    report = compare(os.fspath(dllm), os.fspath(verifier), parsed[0], parsed[1], tok_d, tok_a)
    _CACHE[key] = report
    return report


def banned_for_models(dllm, verifier) -> Optional[tuple]:
    """At load (generate, the Engine, `apd serve`): the banned range of two
    loaded models whose folders hold tokenizers (cached check_pair; raises
    ValueError for an incompatible pair), None when either is a live model or
    has no tokenizer beside it (then only check_compatible's config checks run)."""
    paths = [getattr(m, "path", None) for m in (dllm, verifier)]
    if not all(isinstance(p, str) and os.path.isdir(p) for p in paths):
        return None
    if not all(any(os.path.isfile(os.path.join(p, f)) for f in _TOKENIZER_FILES) for p in paths):
        return None
    report = check_pair(*paths)
    report.raise_if_incompatible()
    return report.banned
