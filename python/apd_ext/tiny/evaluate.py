"""Training-time evaluation with plain transformers modules (no apd kernels).

ar_greedy: greedy decoding of the causal model. dllm_leftright: the dLLM run
bidirectionally, one token per forward, left to right (K=1), with Dream's
shifted logits. Both are batched with left padding and score the generated
text with the task's exact-match scorer.
"""

from __future__ import annotations

import torch

from apd_ext.tasks import arith


def _left_pad(tok, probs):
    enc = [tok(arith.prompt_of(p.question), add_special_tokens=False)["input_ids"] for p in probs]
    P = max(map(len, enc))
    ids = torch.full((len(enc), P), tok.pad_token_id, dtype=torch.long)
    am = torch.zeros((len(enc), P), dtype=torch.long)
    for r, e in enumerate(enc):
        ids[r, P - len(e):] = torch.tensor(e)
        am[r, P - len(e):] = 1
    return ids, am


def _cut(tok, row: list[int]) -> str:
    if tok.eos_token_id in row:
        row = row[: row.index(tok.eos_token_id)]
    return tok.decode(row, skip_special_tokens=True)


def _summary(tok, probs, gens) -> dict:
    texts = [_cut(tok, g) for g in gens]
    ok = [arith.score(t, p.final) for t, p in zip(texts, probs)]
    return {"accuracy": sum(ok) / max(1, len(ok)), "texts": texts, "correct": ok}


@torch.no_grad()
def ar_greedy(model, tok, probs, max_new: int = 64, batch: int = 50) -> dict:
    gens = []
    for s in range(0, len(probs), batch):
        ids, am = _left_pad(tok, probs[s:s + batch])
        out = model.generate(input_ids=ids, attention_mask=am, max_new_tokens=max_new,
                             do_sample=False, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.pad_token_id)
        gens += out[:, ids.shape[1]:].tolist()
    return _summary(tok, probs, gens)


@torch.no_grad()
def dllm_leftright(model, tok, probs, max_new: int = 64, mask_id: int = 2, batch: int = 50) -> dict:
    from apd_ext.tiny.hf_models import bidir_mask
    gens = []
    for s in range(0, len(probs), batch):
        pids, pam = _left_pad(tok, probs[s:s + batch])
        B, P = pids.shape
        ids = torch.cat([pids, torch.full((B, max_new), mask_id, dtype=torch.long)], 1)
        keymask = torch.cat([pam.bool(), torch.ones((B, max_new), dtype=torch.bool)], 1)
        pos = (keymask.long().cumsum(1) - 1).clamp(min=0)
        att = bidir_mask(keymask)
        done = torch.zeros(B, dtype=torch.bool)
        for i in range(max_new):
            h = model.model(input_ids=ids, attention_mask=att, position_ids=pos).last_hidden_state
            nxt = model.lm_head(h[:, P + i - 1]).argmax(-1)  # shifted: row i from hidden i - 1
            nxt = torch.where(done, torch.full_like(nxt, tok.eos_token_id), nxt)
            ids[:, P + i] = nxt
            done |= nxt == tok.eos_token_id
            if bool(done.all()):
                ids[:, P + i + 1:] = tok.eos_token_id
                break
        gens += ids[:, P:].tolist()
    return _summary(tok, probs, gens)


def main(argv: list[str] | None = None) -> int:
    """python -m apd_ext.tiny.evaluate: AR greedy and dLLM K=1 accuracy of checkpoint
    folders (default: the embedded pair, bf16 weights computed in fp32)."""
    import argparse
    import time
    from pathlib import Path

    from apd_ext.tiny import paths, test_file, tokenizer
    from apd_ext.tiny.hf_models import load_exported

    ap = argparse.ArgumentParser(prog="python -m apd_ext.tiny.evaluate")
    ap.add_argument("--dllm", type=Path, default=paths()[0])
    ap.add_argument("--ar", dest="ar", type=Path, default=argparse.SUPPRESS, help=argparse.SUPPRESS)  # old name
    ap.add_argument("--verifier", dest="ar", type=Path, default=paths()[1])
    ap.add_argument("--tasks", type=Path, default=test_file())
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--max-new", type=int, default=56)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    probs = arith.load_jsonl(args.tasks)[: args.limit]
    # the dLLM folder: transformers >= 5 forces Qwen2Tokenizer on a qwen2 folder (see apd_ext.tiny.tokenizer)
    tok = tokenizer(args.dllm)
    for name, d, fn in (("AR greedy", args.ar, ar_greedy), ("dLLM left-to-right K=1", args.dllm, dllm_leftright)):
        t0 = time.time()
        kw = {} if fn is ar_greedy else {"mask_id": tok.mask_token_id}
        res = fn(load_exported(d), tok, probs, max_new=args.max_new, **kw)
        print(f"{name}: {res['accuracy']:.3f} on {len(probs)} problems ({time.time() - t0:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
