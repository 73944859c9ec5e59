"""Retrains the embedded tokenizer, AR model and dLLM from the task's seeds.

    python -m apd_ext.tiny.train [--work DIR] [--out DIR] [--stage all|tok|ar|dllm|export]
                                 [--finetune PAIR_DIR]

Stages (each resumes from the checkpoints it finds in --work):
  tok    byte-level BPE (vocab <= 1024) on train-split text, specials eos/pad/mask;
  ar     Qwen2ForCausalLM, next-token loss on the answer given the question;
  dllm   the same weights run bidirectionally (all-ones attention mask), trained
         with the masked-diffusion objective and Dream's shifted logits;
  export bf16 HF folders: <out>/ar (qwen2) and <out>/dllm (model_type "Dream").

--finetune PAIR_DIR starts the ar and dllm stages from an exported pair's
weights (PAIR_DIR/ar, PAIR_DIR/dllm) and keeps its tokenizer; the data are
half the original 2-4-event problems and half the varied style (1 to 4 events,
more phrasings; arith.generate_varied), and export then rewrites only the
model.safetensors files, leaving every other file of the pair as it is.

Every batch and every mask is a pure function of (seed, step), so a resumed
run sees the same data as an uninterrupted one. CPU threads: --threads.

The shipped pair: `--seed 0`, defaults otherwise, 1 thread on a shared 2-core
CPU: AR 1500 steps in 1709 s (99% on 100 test problems), dLLM 1500 steps in
about 1800 s (its first 500 steps ran under a 1800-step cosine schedule, then
resumed with --dllm-steps 1500: the learning rate of those steps differs from
a fresh run by under 10%). Then fine-tuned (issue 26, one-event questions):
`--finetune python/apd_ext/data/tiny --n-train 40000 --warmup 20`, AR
--ar-lr 5e-4 for 200 steps of a 300-step schedule (stopped there: 100/100 on
the one-event slice), dLLM --dllm-lr 3e-4, 150 steps of a 400-step schedule
then resumed with --dllm-steps 275; 1 thread each, two processes at once on
the shared 2-core CPU (load average 11 to 17): AR 200 steps in about 18 min,
dLLM 275 in about 27 min.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from apd_ext.tasks import arith
from apd_ext.tiny.hf_models import (
    ARCH,
    EOS_ID,
    MASK_ID,
    PAD_ID,
    dllm_logits,
    load_exported,
    new_model,
)

SPECIALS = ["<|endoftext|>", "<|pad|>", "<|mask|>"]  # ids 0, 1, 2: eos(=bos), pad, mask

def log(msg: str, path: Path | None = None) -> None:
    line = f"[{time.strftime('%H:%M:%S')}] {msg}"
    print(line, flush=True)
    if path is not None:
        with open(path, "a") as f:
            f.write(line + "\n")


# ----------------------------------------------------------------------------- tokenizer

def train_tokenizer(out: Path, seed: int, vocab_size: int = 1024, n_texts: int = 20000) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    probs = arith.make_split("train", n_texts, seed + 1)
    texts = [arith.prompt_of(p.question) + p.answer for p in probs]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    write_tokenizer_configs(out)


# A user message framed as the arithmetic task's prompt (tasks/arith.py:
# "Question: ...\nAnswer:\n"), so chat requests on the embedded pair ask what
# it was trained on; the frame already ends where the answer starts, so the
# generation prompt adds nothing. System / assistant turns: their text, then a
# blank line.
CHAT_TEMPLATE = ("{%- for m in messages %}"
                 "{%- if m['role'] == 'user' %}{{ 'Question: ' + m['content'] + '\\nAnswer:\\n' }}"
                 "{%- elif m['role'] == 'assistant' %}{{ m['content'] + '\\n\\n' }}"
                 "{%- else %}{{ m['content'] + '\\n\\n' }}{%- endif %}"
                 "{%- endfor %}")


def write_tokenizer_configs(out: Path) -> None:
    eos, pad, mask = SPECIALS
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 512,
        "bos_token": eos, "eos_token": eos, "pad_token": pad, "mask_token": mask,
        "clean_up_tokenization_spaces": False, "add_bos_token": False,
        "padding_side": "left", "chat_template": CHAT_TEMPLATE}, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps({
        "bos_token": eos, "eos_token": eos, "pad_token": pad, "mask_token": mask}, indent=2) + "\n")


def load_tok(path: Path):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


# ----------------------------------------------------------------------------- data

def finetune_problems(n: int, seed: int) -> list:
    """The fine-tuning mix: n // 2 plain (2-4 events) and n - n // 2 varied train problems."""
    return (arith.make_split("train", n // 2, seed)
            + arith.make_split("train", n - n // 2, seed, style="varied"))


class Data:
    """Tokenized train problems: prompt ids and answer ids (answer ends with EOS)."""

    def __init__(self, tok, n: int, seed: int, probs: list | None = None):
        probs = arith.make_split("train", n, seed) if probs is None else probs
        self.prompts = tok([arith.prompt_of(p.question) for p in probs], add_special_tokens=False)["input_ids"]
        self.answers = [a + [EOS_ID] for a in tok([p.answer for p in probs], add_special_tokens=False)["input_ids"]]
        self.n = len(probs)

    def batch_ids(self, seed: int, step: int, bs: int) -> list[int]:
        g = torch.Generator().manual_seed(seed * 1_000_003 + step)
        return torch.randint(0, self.n, (bs,), generator=g).tolist()


def ar_batch(d: Data, idx: list[int]):
    seqs = [d.prompts[i] + d.answers[i] for i in idx]
    L = max(map(len, seqs))
    ids = torch.full((len(idx), L), PAD_ID, dtype=torch.long)
    am = torch.zeros((len(idx), L), dtype=torch.long)
    labels = torch.full((len(idx), L), -100, dtype=torch.long)
    for r, i in enumerate(idx):
        p, a = d.prompts[i], d.answers[i]
        n = len(p) + len(a)
        ids[r, :n] = torch.tensor(p + a)
        am[r, :n] = 1
        labels[r, len(p):n] = torch.tensor(a)
    return ids, am, labels


def dllm_batch(d: Data, idx: list[int], g: torch.Generator, max_tail: int, eps: float = 1e-3):
    """Prompt + answer + EOS tail (random length up to max_tail), answer region masked w.p. t."""
    B = len(idx)
    rows = []
    for i in idx:
        p, a = d.prompts[i], d.answers[i]
        extra = int(torch.randint(0, max_tail + 1, (1,), generator=g))
        rows.append((p, a + [EOS_ID] * extra))
    L = max(len(p) + len(a) for p, a in rows)
    ids = torch.full((B, L), PAD_ID, dtype=torch.long)
    keymask = torch.zeros((B, L), dtype=torch.bool)
    ans = torch.zeros((B, L), dtype=torch.bool)
    for r, (p, a) in enumerate(rows):
        ids[r, :len(p) + len(a)] = torch.tensor(p + a)
        keymask[r, :len(p) + len(a)] = True
        ans[r, len(p):len(p) + len(a)] = True
    t = eps + (1 - eps) * torch.rand((B, 1), generator=g)
    masked = ans & (torch.rand((B, L), generator=g) < t)
    noisy = ids.masked_fill(masked, MASK_ID)
    return noisy, ids, keymask, masked, t, ans


# ----------------------------------------------------------------------------- model / optim

def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    frac = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))


def save_ckpt(path: Path, model, opt, step: int) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step}, tmp)
    os.replace(tmp, path)


def run_training(kind: str, model, data: Data, args, work: Path, logf: Path) -> None:
    total = args.ar_steps if kind == "ar" else args.dllm_steps
    peak = args.ar_lr if kind == "ar" else args.dllm_lr
    ck = work / f"{kind}.pt"
    opt = torch.optim.AdamW(model.parameters(), lr=peak, betas=(0.9, 0.98), weight_decay=0.01)
    step = 0
    if ck.exists():
        st = torch.load(ck, weights_only=True)
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["opt"])
        step = st["step"]
        log(f"{kind}: resumed at step {step}", logf)
    model.train()
    t0, seen, acc_loss = time.time(), 0, 0.0
    seed = args.seed + (0 if kind == "ar" else 7919)
    while step < total:
        for gr in opt.param_groups:
            gr["lr"] = lr_at(step, total, peak, args.warmup)
        idx = data.batch_ids(seed, step, args.batch)
        if kind == "ar":
            ids, am, labels = ar_batch(data, idx)
            logits = model(input_ids=ids, attention_mask=am).logits[:, :-1]
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))
            seen += int(am.sum())
        else:
            g = torch.Generator().manual_seed(seed * 1_000_003 + step)
            noisy, ids, keymask, masked, t, ans = dllm_batch(data, idx, g, args.max_tail)
            logits = dllm_logits(model, noisy, keymask)
            ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids.reshape(-1), reduction="none")
            ce = ce.view(ids.shape) * masked / t
            loss = ce.sum() / ans.sum().clamp(min=1)
            seen += int(keymask.sum())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        acc_loss += loss.item()
        if step % args.log_every == 0:
            dt = time.time() - t0
            log(f"{kind} step {step}/{total} loss {acc_loss / args.log_every:.4f} "
                f"lr {opt.param_groups[0]['lr']:.2e} {seen / dt:.0f} tok/s", logf)
            acc_loss = 0.0
        if step % args.ckpt_every == 0 or step == total:
            save_ckpt(ck, model, opt, step)
        if args.eval_every and step % args.eval_every == 0 and step < total:
            quick_eval(kind, model, work, args, logf)
            model.train()


def quick_eval(kind: str, model, work: Path, args, logf: Path, n: int | None = None,
               test_file: Path | None = None) -> float:
    from apd_ext.tiny import evaluate
    tok = load_tok(work / "tok")
    test_file = test_file or args.test_file
    probs = arith.load_jsonl(test_file)[: n or args.eval_n]
    model.eval()
    with torch.no_grad():
        if kind == "ar":
            res = evaluate.ar_greedy(model, tok, probs, max_new=args.max_new)
        else:
            res = evaluate.dllm_leftright(model, tok, probs, max_new=args.max_new, mask_id=MASK_ID)
    log(f"{kind} eval on {len(probs)} of {test_file.name}: accuracy {res['accuracy']:.3f}", logf)
    return res["accuracy"]


# ----------------------------------------------------------------------------- export

def export_weights(work: Path, out: Path, logf: Path) -> None:
    """Fine-tuned weights into an existing pair: only model.safetensors changes."""
    from safetensors.torch import save_file
    for kind in ("ar", "dllm"):
        d = out / kind
        if not (d / "config.json").is_file():
            raise SystemExit(f"--out: {d} holds no exported pair (no config.json)")
        st = torch.load(work / f"{kind}.pt", weights_only=True)["model"]
        tensors = {k: v.to(torch.bfloat16).contiguous() for k, v in st.items()}
        if kind == "ar":
            tensors.pop("lm_head.weight", None)  # tied: the head is the embedding
        else:
            tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
        save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
        log(f"exported {kind} weights -> {d / 'model.safetensors'}", logf)


def export(work: Path, out: Path, logf: Path) -> None:
    from safetensors.torch import save_file
    tok_dir = work / "tok"
    vocab = len(load_tok(tok_dir))
    for kind in ("ar", "dllm"):
        st = torch.load(work / f"{kind}.pt", weights_only=True)["model"]
        d = out / kind
        if d.exists():
            shutil.rmtree(d)
        d.mkdir(parents=True)
        for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            shutil.copy(tok_dir / f, d / f)
        tensors = {k: v.to(torch.bfloat16).contiguous() for k, v in st.items()}
        cfg = {
            "attention_dropout": 0.0, "bos_token_id": EOS_ID, "eos_token_id": EOS_ID,
            "hidden_act": "silu", "hidden_size": ARCH["hidden_size"], "initializer_range": 0.02,
            "intermediate_size": ARCH["intermediate_size"],
            "max_position_embeddings": ARCH["max_position_embeddings"],
            "max_window_layers": ARCH["num_hidden_layers"],
            "num_attention_heads": ARCH["num_attention_heads"],
            "num_hidden_layers": ARCH["num_hidden_layers"],
            "num_key_value_heads": ARCH["num_key_value_heads"], "pad_token_id": PAD_ID,
            "rms_norm_eps": ARCH["rms_norm_eps"], "rope_scaling": None,
            "rope_theta": ARCH["rope_theta"], "sliding_window": None,
            "torch_dtype": "bfloat16", "use_sliding_window": False, "vocab_size": vocab,
        }
        if kind == "ar":
            tensors.pop("lm_head.weight", None)  # tied: the head is the embedding
            cfg = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
                   "tie_word_embeddings": True, "use_cache": True, **cfg}
            gen = {"bos_token_id": EOS_ID, "eos_token_id": EOS_ID, "pad_token_id": PAD_ID,
                   "do_sample": False}
        else:
            # Dream-v0-Instruct-7B's layout: untied head stored explicitly, mask id in the config.
            tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
            cfg = {"architectures": ["DreamModel"], "model_type": "Dream",
                   "mask_token_id": MASK_ID, "tie_word_embeddings": False, "use_cache": False, **cfg}
            gen = {"bos_token_id": EOS_ID, "eos_token_id": EOS_ID, "pad_token_id": PAD_ID,
                   "mask_token_id": MASK_ID, "max_new_tokens": 56, "alg": "entropy",
                   "temperature": 0.0}
        save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
        (d / "config.json").write_text(json.dumps(dict(sorted(cfg.items())), indent=2) + "\n")
        (d / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
        log(f"exported {kind} -> {d} ({(d / 'model.safetensors').stat().st_size / 1e6:.1f} MB)", logf)


# ----------------------------------------------------------------------------- main

def make_1op_test(seed: int, n: int = 200) -> list:
    """The one-event held-out slice: varied style, test split, its own seed
    (seed + 1000), so neither the hash split nor the stream meets training."""
    return arith.make_split("test", n, seed + 1000, style="varied", n_ops=1)


def main(argv: list[str] | None = None) -> int:
    here = Path(__file__).resolve().parent.parent
    ap = argparse.ArgumentParser(prog="python -m apd_ext.tiny.train", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("tiny_work"))
    ap.add_argument("--out", type=Path, default=here / "data" / "tiny")
    ap.add_argument("--stage", default="all", choices=["all", "tok", "ar", "dllm", "export"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--n-train", type=int, default=100000)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--ar-steps", type=int, default=1500)
    ap.add_argument("--dllm-steps", type=int, default=1500)
    ap.add_argument("--ar-lr", type=float, default=2e-3)
    ap.add_argument("--dllm-lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--max-tail", type=int, default=30, help="max extra EOS after the answer (dLLM)")
    ap.add_argument("--max-new", type=int, default=56)
    ap.add_argument("--log-every", type=int, default=25)
    ap.add_argument("--ckpt-every", type=int, default=100)
    ap.add_argument("--eval-every", type=int, default=0)
    ap.add_argument("--eval-n", type=int, default=100)
    ap.add_argument("--test-file", type=Path, default=here / "data" / "arith_test.jsonl")
    ap.add_argument("--test-file-1op", type=Path, default=here / "data" / "arith_test_1op.jsonl")
    ap.add_argument("--finetune", type=Path, default=None, metavar="PAIR_DIR",
                    help="start from this exported pair's weights and tokenizer (e.g. the shipped "
                         "python/apd_ext/data/tiny) and train on the plain + varied mix")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    logf = work / "train.log"
    stages = ["tok", "ar", "dllm", "export"] if args.stage == "all" else [args.stage]
    t_start = time.time()
    if not args.test_file.exists():
        arith.save_jsonl(arith.make_split("test", 500, args.seed), args.test_file)
        log(f"wrote {args.test_file}", logf)
    if not args.test_file_1op.exists():
        arith.save_jsonl(make_1op_test(args.seed), args.test_file_1op)
        log(f"wrote {args.test_file_1op}", logf)
    ft = args.finetune
    if ft is not None and "tok" in stages:
        raise SystemExit("--finetune keeps the pair's tokenizer: use --stage ar, dllm, export or all")
    if ft is not None and not (work / "tok" / "tokenizer.json").exists():
        (work / "tok").mkdir(parents=True, exist_ok=True)
        for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            shutil.copy(ft / "dllm" / f, work / "tok" / f)
    if stages != ["export"] and not (work / "tok" / "tokenizer.json").exists():
        train_tokenizer(work / "tok", args.seed)
        log(f"tokenizer: {len(load_tok(work / 'tok'))} tokens", logf)
    if "ar" in stages or "dllm" in stages:
        tok = load_tok(work / "tok")
        probs = finetune_problems(args.n_train, args.seed) if ft is not None else None
        data = Data(tok, args.n_train, args.seed, probs)
        log(f"data: {data.n} train problems" + (" (plain + varied)" if ft is not None else ""), logf)
    for kind in ("ar", "dllm"):
        if kind not in stages:
            continue
        t0 = time.time()
        if ft is not None and not (work / f"{kind}.pt").exists():
            model = load_exported(ft / kind)
            log(f"{kind}: starting from {ft / kind}", logf)
        else:
            model = new_model(len(tok), args.seed)
            if kind == "dllm" and not (work / "dllm.pt").exists():  # from the trained AR weights
                model.load_state_dict(torch.load(work / "ar.pt", weights_only=True)["model"])
        run_training(kind, model, data, args, work, logf)
        log(f"{kind}: trained in {time.time() - t0:.0f} s", logf)
        quick_eval(kind, model, work, args, logf)
        quick_eval(kind, model, work, args, logf, test_file=args.test_file_1op)
    if "export" in stages:
        export(work, args.out, logf) if ft is None else export_weights(work, args.out, logf)
    log(f"done in {time.time() - t_start:.0f} s", logf)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
