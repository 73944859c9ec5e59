"""transformers ``generate`` as a drop-in for APD (transformers >= 4.56 custom_generate).

Callable form (transformers prepares the inputs, generation_config and
stopping criteria, then calls ``apd_generate`` as the decoding loop)::

    out = verifier_hf.generate(input_ids, attention_mask=mask, custom_generate=apd_generate,
                               dllm=dllm_hf, R=0.7, W=16, M=100, max_new_tokens=256)

Folder form (``custom_generate/generate.py`` under :func:`custom_generate_dir`;
transformers executes it, hence ``trust_remote_code=True``)::

    out = verifier_hf.generate(input_ids, custom_generate=custom_generate_dir(),
                               trust_remote_code=True, dllm=dllm_hf, R=0.7)

The verifier is the model whose ``generate`` is called; ``dllm`` is a live
transformers module holding the dLLM's weights (wrapped with
``apd_ext.load_model(dllm, kind="dllm")``, tensors shared, not copied), an
``apd_ext.load_model`` runtime, or a local checkpoint folder.

Honoured: ``max_new_tokens`` / ``max_length``, ``eos_token_id``, ``pad_token_id``,
``do_sample`` (False: greedy), ``temperature``, ``top_p``, ``top_k``,
``stopping_criteria`` (each sequence is cut just after the first token where a
criterion fires; stop strings: pass ``StopStringCriteria(tok, [...])`` there, since
transformers 5.x drops the ``tokenizer=`` that ``stop_strings=`` needs before it
calls a callable custom_generate, and ``stop_tokenizer=tok``: the stop strings
then go into the Engine's output path, so a sequence stops at the step that
produces one instead of running to EOS / the budget), ``attention_mask`` (left or right padding),
batched input, ``return_dict_in_generate``. Sampling uses apd_ext's counter-based
noise (``seed`` / ``seeds``), so the tokens equal apd_ext.generate's with the same
seed, not those of transformers' multinomial sampler. Options APD cannot honour
(beam search, repetition penalties, scores, ...) raise a ValueError naming the option.
"""
from __future__ import annotations

import weakref
from pathlib import Path
from typing import Optional

import torch

# id(module) -> (weakref to module, runtime): wrap each live model once (the fused
# QKV projection is the one tensor load_model builds; everything else is shared).
_WRAPPED: dict = {}

# generation_config fields APD has no counterpart for, with the values that mean "off".
_OFF = (None, False)
_UNSUPPORTED = {
    "num_beams": (None, 1), "num_beam_groups": (None, 1), "penalty_alpha": (None, 0, 0.0),
    "num_return_sequences": (None, 1), "repetition_penalty": (None, 1.0), "encoder_repetition_penalty": (None, 1.0),
    "no_repeat_ngram_size": (None, 0), "encoder_no_repeat_ngram_size": (None, 0), "bad_words_ids": _OFF,
    "force_words_ids": _OFF, "sequence_bias": _OFF, "guidance_scale": (None, 1.0),
    # min_new_tokens first: generate() also turns it into min_length, which names it less well
    "min_new_tokens": (None, 0), "min_length": (None, 0), "begin_suppress_tokens": _OFF, "suppress_tokens": _OFF,
    "forced_bos_token_id": _OFF, "forced_eos_token_id": _OFF, "prompt_lookup_num_tokens": _OFF,
    "assistant_early_exit": _OFF, "epsilon_cutoff": (None, 0.0), "eta_cutoff": (None, 0.0),
    "typical_p": (None, 1.0), "min_p": _OFF, "top_h": _OFF, "output_scores": _OFF, "output_logits": _OFF,
    "output_attentions": _OFF, "output_hidden_states": _OFF, "watermarking_config": _OFF, "dola_layers": _OFF,
    "constraints": _OFF, "exponential_decay_length_penalty": _OFF, "renormalize_logits": _OFF,
    "token_healing": _OFF,
}
# Logits processors that generation_config's sampling fields create (APD applies
# temperature / top-k / top-p itself, per DESIGN §4); any other processor is refused.
_OWN_PROCESSORS = ("TemperatureLogitsWarper", "TopKLogitsWarper", "TopPLogitsWarper")


def custom_generate_dir() -> str:
    """The local folder to pass as ``custom_generate=`` (it holds custom_generate/generate.py)."""
    return str(Path(__file__).resolve().parent / "hf_repo")


def _runtime(src, kind: str, like=None, mask_token_id=None):
    """src (live module, runtime or folder) -> a Qwen2Runtime; a folder loads on `like`'s dtype/device."""
    import apd_ext
    from apd_ext.models.qwen2 import Qwen2Runtime

    if isinstance(src, Qwen2Runtime):
        return src
    if isinstance(src, (str, Path)):
        return apd_ext.load_model(str(src), dtype=like.dtype, device=like.device)
    if not isinstance(src, torch.nn.Module):
        raise TypeError(f"dllm: expected a transformers module, an apd_ext.load_model runtime or a "
                        f"checkpoint folder, got {type(src).__name__}")
    hit = _WRAPPED.get((id(src), kind))
    if hit is not None and hit[0]() is src:
        return hit[1]
    if kind == "dllm" and mask_token_id is None:
        mask_token_id = getattr(src.config, "mask_token_id", None)
        if mask_token_id is None:
            raise ValueError("mask_token_id: the dllm module's config has none; pass mask_token_id=")
    rt = apd_ext.load_model(src, kind=kind, mask_token_id=mask_token_id if kind == "dllm" else None)
    for key in [k for k, (ref, _) in _WRAPPED.items() if ref() is None]:
        del _WRAPPED[key]  # models that were freed (their ids may be reused)
    _WRAPPED[(id(src), kind)] = (weakref.ref(src), rt)
    return rt


def _is_off(value, off) -> bool:
    """value is one of the "off" values (None / False by identity: 0 == False must not match)."""
    for o in off:
        if o is None or o is False:
            if value is o:
                return True
        elif not isinstance(value, bool) and value == o:
            return True
    return False


def _check_options(generation_config, logits_processor, streamer, synced_gpus, model_kwargs) -> None:
    for name, off in _UNSUPPORTED.items():
        value = getattr(generation_config, name, None)
        if not _is_off(value, off):
            raise ValueError(f"{name}={value!r}: not supported by APD's custom_generate "
                             "(unset it, or use transformers' own decoding)")
    for p in logits_processor or []:
        if type(p).__name__ not in _OWN_PROCESSORS:
            raise ValueError(f"logits_processor: {type(p).__name__} is not supported by APD's custom_generate "
                             "(temperature, top_k and top_p come from generation_config)")
    if streamer is not None:
        raise ValueError("streamer: not supported by APD's custom_generate (use apd_ext.generate's callback)")
    if synced_gpus:
        raise ValueError("synced_gpus: not supported by APD's custom_generate")
    extra = sorted(k for k, v in model_kwargs.items()
                   if v is not None and k not in ("attention_mask", "position_ids", "use_cache", "logits_to_keep",
                                                  "cache_position", "past_key_values", "cache"))
    if extra:
        raise ValueError(f"{extra[0]}: not supported by APD's custom_generate")
    for name in ("past_key_values", "cache"):
        # generate() always prepares an empty cache; only a filled one (a user's) matters.
        c = model_kwargs.get(name)
        if c is not None and hasattr(c, "get_seq_length") and c.get_seq_length() > 0:
            raise ValueError(f"{name}: a filled cache is not supported by APD's custom_generate "
                             "(it keeps its own caches)")


def _sampling(gc) -> dict:
    if not gc.do_sample:
        return {"temperature": 0.0, "top_p": 1.0, "top_k": 0}
    return {"temperature": 1.0 if gc.temperature is None else float(gc.temperature),
            "top_p": 1.0 if gc.top_p is None else float(gc.top_p),
            "top_k": int(gc.top_k or 0)}


def _ids(value) -> list:
    if value is None:
        return []
    if isinstance(value, torch.Tensor):
        return [int(v) for v in value.flatten().tolist()]
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


def _stop_index(criteria, row: torch.Tensor, gen: list) -> int:
    """Number of generated tokens kept: cut just after the first token where a criterion fires."""
    if not criteria:
        return len(gen)
    g = torch.tensor(gen, dtype=row.dtype, device=row.device)
    for i in range(1, len(gen) + 1):
        ids = torch.cat([row, g[:i]])[None]  # [1, P + i]: the row as transformers would hold it
        done = criteria(ids, None)
        if bool(done.any() if isinstance(done, torch.Tensor) else done):
            return i
    return len(gen)


def _stop_strings(criteria, tok) -> list:
    """The stop strings of the StopStringCriteria in criteria (for the Engine), [] without a tokenizer."""
    from transformers import StopStringCriteria

    stops = [s for c in (criteria or []) if isinstance(c, StopStringCriteria) for s in c.stop_strings]
    if stops and tok is None:
        import warnings
        warnings.warn("stopping_criteria: a StopStringCriteria without stop_tokenizer=... only cuts the "
                      "result; pass stop_tokenizer=tok so generation stops at the stop string", stacklevel=3)
        return []
    return stops


def apd_generate(model, input_ids, logits_processor=None, stopping_criteria=None, generation_config=None,
                 synced_gpus: bool = False, streamer=None, *, dllm=None, R: float = 0.7, W: Optional[int] = 16,
                 M: int = 100, acceptance: str = "coupled", compat: Optional[str] = None, seed: int = 0,
                 seeds=None, mask_token_id: Optional[int] = None, cuda_graphs: bool = False, stop_tokenizer=None,
                 **model_kwargs):
    """A transformers ``custom_generate`` decoding loop running APD with ``model`` as the verifier.

    model: the transformers Qwen2 model ``generate`` was called on (the AR verifier).
    input_ids [B, P] (with model_kwargs["attention_mask"] [B, P] when padded),
    generation_config / stopping_criteria / logits_processor: as prepared by generate.
    dllm, R, W, M, acceptance, compat, seed, seeds, cuda_graphs: as in apd_ext.generate.
    stop_tokenizer: the tokenizer of the pair; with it, the stop strings of a
    StopStringCriteria in stopping_criteria end generation early (Engine
    output path); without it they only cut the result (a warning says so).
    Returns sequences [B, P + n] (prompt as given, then the generated tokens,
    pad_token_id after a sequence's end), or a GenerateDecoderOnlyOutput when
    return_dict_in_generate.
    """
    import apd_ext
    from transformers import GenerationConfig
    from transformers.generation.utils import GenerateDecoderOnlyOutput

    if dllm is None:
        raise ValueError("dllm: APD's custom_generate needs the diffusion model (dllm=...)")
    gc = generation_config if generation_config is not None else GenerationConfig()
    _check_options(gc, logits_processor, streamer, synced_gpus, model_kwargs)
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        got = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise ValueError(f"input_ids: expected a [B, L] LongTensor, got {got}")
    B, P = input_ids.shape
    if gc.max_new_tokens is not None:
        max_new = int(gc.max_new_tokens)
    elif gc.max_length is not None:
        max_new = int(gc.max_length) - P
    else:
        raise ValueError("max_new_tokens: set max_new_tokens (or max_length) in generation_config")
    if max_new < 1:
        raise ValueError(f"max_new_tokens: expected >= 1 new tokens, got {max_new} "
                         f"(max_length {gc.max_length}, prompt length {P})")
    verifier = _runtime(model, "ar")
    dev = verifier.device
    dllm_rt = _runtime(dllm, "dllm", verifier, mask_token_id)
    eos = _ids(getattr(gc, "_eos_token_tensor", None)) or _ids(gc.eos_token_id) or None
    pad = _ids(getattr(gc, "_pad_token_tensor", None)) or _ids(gc.pad_token_id)
    mask = model_kwargs.get("attention_mask")
    ids_in = input_ids.to(dev)
    stops = _stop_strings(stopping_criteria, stop_tokenizer)
    out = apd_ext.generate(dllm_rt, verifier, ids_in, apd_ext.APDConfig(
        R=R, W=W, M=M, acceptance=acceptance, compat=compat, max_new_tokens=max_new, seed=seed, **_sampling(gc)),
        eos_token_ids=eos, attention_mask=None if mask is None else mask.to(dev), seeds=seeds,
        cuda_graphs=cuda_graphs, stop_strings=stops or None, tokenizer=stop_tokenizer if stops else None)
    gens = [out.generated(b).tolist() for b in range(B)]
    gens = [g[:_stop_index(stopping_criteria, ids_in[b], g)] for b, g in enumerate(gens)]
    width = max(len(g) for g in gens)
    if pad:
        fill = pad[0]
    elif all(len(g) == width for g in gens):
        fill = 0  # never written
    else:
        raise ValueError("pad_token_id: sequences of a batch end at different lengths; set pad_token_id "
                         "(or eos_token_id) in generation_config")
    new = torch.full((B, width), fill, dtype=input_ids.dtype, device=dev)  # [B, n]
    for b, g in enumerate(gens):
        new[b, : len(g)] = torch.tensor(g, dtype=input_ids.dtype)
    sequences = torch.cat([ids_in, new], dim=1).to(input_ids.device)  # [B, P + n]
    if gc.return_dict_in_generate:
        return GenerateDecoderOnlyOutput(sequences=sequences)
    return sequences
