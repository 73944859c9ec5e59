"""check_compatible: can this dLLM and this AR verifier run one APD loop?

APD compares token ids drafted by one model with ids scored by the other, so
the ids they share must mean the same tokens. The verifier's vocabulary may be
smaller than the dLLM's (Qwen2.5's 151936 rows vs Dream's 152064: padding
rows); the mixture then runs over the first min(V_D, V_A) ids (DESIGN.md §4).
"""
from __future__ import annotations


def _vocab(tok, name: str) -> dict:
    get_vocab = getattr(tok, "get_vocab", None)
    if get_vocab is None:
        raise TypeError(f"{name}: expected a tokenizer with get_vocab(), got {type(tok).__name__}")
    return get_vocab()


def check_compatible(dllm, verifier, tokenizer_dllm=None, tokenizer_verifier=None) -> None:
    """Raise ValueError naming the mismatch; return None when the pair is usable.

    The cheap check (configs, optional tokenizers, no bans): apd_ext.check_pair
    (apd_ext/pairs.py) is the full report on two folders, with the ids to ban
    when only special tokens collide; the Engine runs that one at load.

    Checks: the kinds ("dllm" then "ar"); every special id (EOS, BOS, pad, and
    the dLLM's mask id) inside the vocabulary that must score it; the BOS ids
    agree and the EOS sets share an id. With tokenizers: each fits its model's
    vocabulary, and every token id below min(V_D, V_A) that both tokenizers
    define is the same token string in both.
    """
    if getattr(dllm, "kind", None) != "dllm":
        raise ValueError(f"dllm: expected a model of kind 'dllm', got kind {getattr(dllm, 'kind', None)!r}")
    if getattr(verifier, "kind", None) != "ar":
        raise ValueError(f"verifier: expected a model of kind 'ar', got kind {getattr(verifier, 'kind', None)!r}")
    cd, ca = dllm.config, verifier.config
    vd, va = cd.vocab_size, ca.vocab_size
    v = min(vd, va)

    def ids_in(name, ids, bound, who):
        for i in ids:
            if i is not None and not (0 <= i < bound):
                raise ValueError(f"{name} {i} is outside the {who} vocabulary [0, {bound})")

    ids_in("dllm mask_token_id", [cd.mask_token_id], vd, "dLLM's")
    shared_special = cd.eos_token_ids + ca.eos_token_ids
    shared_special += [cd.bos_token_id, ca.bos_token_id, cd.pad_token_id, ca.pad_token_id]
    ids_in("special token id", shared_special, v, f"shared (min of {vd} and {va})")
    if cd.bos_token_id is not None and ca.bos_token_id is not None and cd.bos_token_id != ca.bos_token_id:
        raise ValueError(f"bos_token_id mismatch: dLLM {cd.bos_token_id}, verifier {ca.bos_token_id}")
    if cd.eos_token_ids and ca.eos_token_ids and not set(cd.eos_token_ids) & set(ca.eos_token_ids):
        raise ValueError(f"eos_token_id mismatch: dLLM {cd.eos_token_ids}, verifier {ca.eos_token_ids} share no id")
    if cd.mask_token_id in ca.eos_token_ids:
        raise ValueError(f"the dLLM's mask_token_id {cd.mask_token_id} is an EOS id of the verifier")

    if (tokenizer_dllm is None) != (tokenizer_verifier is None):
        raise ValueError("tokenizer_dllm / tokenizer_verifier: pass both or neither")
    if tokenizer_dllm is None:
        return
    tok_d = _vocab(tokenizer_dllm, "tokenizer_dllm")
    tok_a = _vocab(tokenizer_verifier, "tokenizer_verifier")
    for name, tok, bound in (("tokenizer_dllm", tok_d, vd), ("tokenizer_verifier", tok_a, va)):
        top = max(tok.values(), default=-1)
        if top >= bound:
            raise ValueError(f"{name}: token id {top} does not fit the model's vocabulary of {bound}")
    # An id only one tokenizer defines (e.g. Dream's <|mask|>) is a padding row
    # of the other model: harmless. An id both define must be the same token.
    id_to_d = {i: t for t, i in tok_d.items() if i < v}
    id_to_a = {i: t for t, i in tok_a.items() if i < v}
    for i in sorted(set(id_to_d) & set(id_to_a)):
        td, ta = id_to_d[i], id_to_a[i]
        if td != ta:
            raise ValueError(f"tokenizer mismatch at id {i}: dLLM token {td!r}, verifier token {ta!r}")
    if cd.mask_token_id is not None and cd.mask_token_id not in tok_d.values():
        raise ValueError(f"tokenizer_dllm: mask_token_id {cd.mask_token_id} is not a token of the dLLM's tokenizer")
