"""Checkpoint loading: time, peak RSS and resident bytes of apd_ext.load_model
on real-sized sharded Dream folders (issue 24 part 4).

    python bench/bench_load.py --dir /tmp/apd_load_bench [--shapes 1.5b,7b] [--rounds 3]
           [--baseline-rev main] [--no-baseline | --baseline-only] [--baseline-7b] [--write-only] [--delete-7b]

Writes, once (cached in --dir), random-bf16 sharded Dream folders of two shapes:
  1.5b: Qwen2.5-1.5B's shape (hidden 1536, 28 layers, 12 / 2 heads, intermediate
        8960, vocab 151936, untied head): 3.3 GiB bf16, loaded as float32 (a
        converting load: 6.6 GiB resident);
  7b:   Dream-7B's shape (hidden 3584, 28 layers, 28 / 4 heads, intermediate
        18944, vocab 152064, untied head): 14.2 GiB bf16, loaded as bf16.
Each tensor is written in row chunks straight into its shard (the safetensors
layout: 8-byte header length, JSON header, raw little-endian data), so writing
never holds more than one chunk. The files are then checked with safetensors'
own reader (safe_open: the keys and shapes).

Each load runs in a fresh subprocess, so its peak is its own: peak RSS is
/proc/self/status VmHWM (it counts mapped file pages too), "before" is VmRSS
after `import apd_ext`, resident is the bytes of the distinct storages the
runtime keeps. The baseline is the loader of --baseline-rev (git archive of its
python/ into --dir, with this tree's compiled _C copied in: csrc/ is the same),
interleaved with ours round by round; median and spread over --rounds. The
7b baseline is off unless --baseline-7b: the issue measured the old loader at
~21 GiB peak for this shape, which this shared 24 GiB machine cannot spare.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SHAPES = {
    "1.5b": dict(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                 intermediate_size=8960, vocab_size=151936, load_dtype="float32", shard_gib=1.0),
    "7b": dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
               intermediate_size=18944, vocab_size=152064, load_dtype="bfloat16", shard_gib=4.0),
}
CHUNK_BYTES = 64 << 20  # rows generated and written per write


def tensor_shapes(s: dict) -> dict:
    """Checkpoint names and shapes, in the order Dream's own shards list them."""
    H, I, V = s["hidden_size"], s["intermediate_size"], s["vocab_size"]
    D = H // s["num_attention_heads"]
    q, kv = s["num_attention_heads"] * D, s["num_key_value_heads"] * D
    out = {"model.embed_tokens.weight": (V, H)}
    for i in range(s["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out.update({
            p + "input_layernorm.weight": (H,),
            p + "mlp.down_proj.weight": (H, I), p + "mlp.gate_proj.weight": (I, H), p + "mlp.up_proj.weight": (I, H),
            p + "post_attention_layernorm.weight": (H,),
            p + "self_attn.k_proj.bias": (kv,), p + "self_attn.k_proj.weight": (kv, H),
            p + "self_attn.o_proj.weight": (H, q),
            p + "self_attn.q_proj.bias": (q,), p + "self_attn.q_proj.weight": (q, H),
            p + "self_attn.v_proj.bias": (kv,), p + "self_attn.v_proj.weight": (kv, H),
        })
    out["model.norm.weight"] = (H,)
    out["lm_head.weight"] = (V, H)
    return out


def _nbytes(shape) -> int:
    n = 2  # bf16
    for d in shape:
        n *= d
    return n


def _write_shard(path: str, shapes: dict, gen: torch.Generator) -> None:
    header, off = {}, 0
    for name, shape in shapes.items():
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [off, off + _nbytes(shape)]}
        off += _nbytes(shape)
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # data aligned to 8 bytes, as safetensors writes it
    with open(path + ".part", "wb") as f:
        f.write(len(head).to_bytes(8, "little"))
        f.write(head)
        for name, shape in shapes.items():
            cols = shape[1] if len(shape) > 1 else shape[0]
            rows = shape[0] if len(shape) > 1 else 1
            per = max(1, CHUNK_BYTES // (2 * cols))
            for r in range(0, rows, per):
                t = torch.randn((min(per, rows - r), cols), generator=gen) * 0.02
                if "norm" in name:
                    t += 1.0
                f.write(t.to(torch.bfloat16).view(torch.uint8).numpy().tobytes())
    os.replace(path + ".part", path)


def write_folder(folder: str, s: dict, seed: int = 0) -> None:
    """A sharded random-bf16 Dream folder (config.json, generation_config.json,
    index, shards), written once: a complete folder is reused."""
    if os.path.isfile(os.path.join(folder, "config.json")):
        return
    os.makedirs(folder, exist_ok=True)
    shapes = tensor_shapes(s)
    limit = int(s["shard_gib"] * 2**30)
    shards, cur, size = [], {}, 0
    for name, shape in shapes.items():
        if cur and size + _nbytes(shape) > limit:
            shards.append(cur)
            cur, size = {}, 0
        cur[name] = shape
        size += _nbytes(shape)
    shards.append(cur)
    gen = torch.Generator().manual_seed(seed)
    weight_map = {}
    for i, sh in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        print(f"  writing {folder}/{fname} ({sum(map(_nbytes, sh.values())) / 2**30:.2f} GiB)", flush=True)
        _write_shard(os.path.join(folder, fname), sh, gen)
        weight_map.update({n: fname for n in sh})
    total = sum(map(_nbytes, shapes.values()))
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    with open(os.path.join(folder, "generation_config.json"), "w") as f:
        json.dump({"mask_token_id": 151666, "eos_token_id": 151643, "pad_token_id": 151643}, f)
    cfg = {k: v for k, v in s.items() if k not in ("load_dtype", "shard_gib")}
    cfg.update(model_type="Dream", architectures=["DreamModel"], hidden_act="silu", rope_theta=1000000.0,
               rms_norm_eps=1e-6, max_position_embeddings=32768, tie_word_embeddings=False,
               mask_token_id=151666, torch_dtype="bfloat16")
    with open(os.path.join(folder, "config.json"), "w") as f:  # last: marks the folder complete
        json.dump(cfg, f)
    _check_with_safetensors(folder, shapes, weight_map)


def _check_with_safetensors(folder: str, shapes: dict, weight_map: dict) -> None:
    from safetensors import safe_open

    for fname in sorted(set(weight_map.values())):
        with safe_open(os.path.join(folder, fname), framework="pt") as f:
            for name in f.keys():
                assert tuple(f.get_slice(name).get_shape()) == shapes[name], name


# Runs in the fresh subprocess: one load, then one JSON line.
_CHILD = r"""
import json, sys, time, inspect
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
import torch, apd_ext
folder, dtype = sys.argv[1], getattr(torch, sys.argv[2])
kw = {"quiet": True} if "quiet" in inspect.signature(apd_ext.load_model).parameters else {}
before = status("VmRSS")
t0 = time.perf_counter()
m = apd_ext.load_model(folder, dtype=dtype, device="cpu", **kw)
sec = time.perf_counter() - t0
seen, resident = set(), 0
ts = [m.embed, m.lm_head, m.norm, m.inv_freq]
for l in m.layers:
    ts += [t for t in vars(l).values() if isinstance(t, torch.Tensor)]
for t in ts:
    st = t.untyped_storage()
    if st.data_ptr() not in seen:
        seen.add(st.data_ptr()); resident += st.nbytes()
print(json.dumps(dict(seconds=sec, before=before, peak=status("VmHWM"), rss_after=status("VmRSS"),
                      resident=resident, dtype=str(m.dtype))))
"""


def measure(pythonpath: str, folder: str, dtype: str) -> dict:
    env = dict(os.environ, PYTHONPATH=pythonpath)
    r = subprocess.run([sys.executable, "-c", _CHILD, folder, dtype], capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise RuntimeError(f"load of {folder} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def baseline_python(rev: str, where: str) -> str:
    """rev's python/ (git archive), with this tree's compiled extension copied in."""
    dest = os.path.join(where, f"baseline-{rev.replace('/', '_')}")
    if not os.path.isdir(dest):
        tmp = tempfile.mkdtemp(dir=where)
        tar_path = os.path.join(tmp, "py.tar")
        subprocess.run(["git", "-C", ROOT, "archive", "-o", tar_path, rev, "python"], check=True)
        with tarfile.open(tar_path) as tar:
            tar.extractall(tmp, filter="data")
        for so in glob.glob(os.path.join(ROOT, "python", "apd_ext", "_C*.so")):
            shutil.copy(so, os.path.join(tmp, "python", "apd_ext"))
        os.replace(os.path.join(tmp, "python"), dest)
        shutil.rmtree(tmp)
    return dest


def _gib(x) -> str:
    return f"{x / 2**30:.2f}"


def report(label: str, rows: list) -> dict:
    sec = [r["seconds"] for r in rows]
    peak = [r["peak"] for r in rows]
    r0 = rows[0]
    out = dict(label=label, seconds=statistics.median(sec), sec_min=min(sec), sec_max=max(sec),
               peak=statistics.median(peak), peak_max=max(peak), before=r0["before"], resident=r0["resident"])
    print(f"| {label} | {out['seconds']:.1f} s ({out['sec_min']:.1f} .. {out['sec_max']:.1f}) | "
          f"{_gib(out['peak'])} (max {_gib(out['peak_max'])}) | {_gib(out['before'])} | {_gib(out['resident'])} | "
          f"{out['peak'] / out['resident']:.3f} | {(out['peak'] - out['before']) / out['resident']:.3f} |", flush=True)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", required=True, help="cache directory for the folders and the baseline code")
    ap.add_argument("--shapes", default="1.5b,7b")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (the 7b shape runs once)")
    ap.add_argument("--baseline-rev", default="main", help="git revision whose loader is the baseline")
    ap.add_argument("--no-baseline", action="store_true")
    ap.add_argument("--baseline-only", action="store_true", help="only the old loader (when memory is short)")
    ap.add_argument("--baseline-7b", action="store_true", help="also run the old loader on 7b (~21 GiB peak)")
    ap.add_argument("--write-only", action="store_true", help="write the folders, load nothing")
    ap.add_argument("--delete-7b", action="store_true", help="delete the 14.2 GiB 7b folder afterwards")
    args = ap.parse_args(argv)
    os.makedirs(args.dir, exist_ok=True)
    ours = os.path.join(ROOT, "python")
    base = None if args.no_baseline else baseline_python(args.baseline_rev, args.dir)
    print("| load | time, median (min .. max) | peak RSS GiB, median (max) | RSS before GiB | resident GiB | "
          "peak / resident | (peak - before) / resident |")
    print("|---|---|---|---|---|---|---|")
    for key in args.shapes.split(","):
        s = SHAPES[key]
        folder = os.path.join(args.dir, f"dream-{key}")
        write_folder(folder, s)
        if args.write_only:
            continue
        runs = {} if args.baseline_only else {"ours": []}
        if base is not None and (key != "7b" or args.baseline_7b):
            runs[f"{args.baseline_rev}"] = []
        rounds = 1 if key == "7b" else args.rounds
        for _ in range(rounds):
            for name in runs:  # interleaved: round r of each before round r + 1 of any
                runs[name].append(measure(ours if name == "ours" else base, folder, s["load_dtype"]))
        for name, rows in runs.items():
            report(f"{key} bf16 -> {s['load_dtype']}, {name}", rows)
        if key == "7b" and args.delete_7b:
            shutil.rmtree(folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
