"""Prepare throughput: raysmol's Ray Data prepare path vs one process tokenizing the same corpus.

What is measured (tokens/s of read + json-parse + tokenize + append EOS + split train/val + write .npy):

* ``raysmol``    ``raysmol.data.prepare.prepare(cfg, tok)`` on a local Ray (``num_cpus = --num-cpus``), the
                 three sources of ``jobs/tiny.yaml`` pointed at the embedded default corpus files. Each
                 repeat uses a fresh ``data.cache_dir`` so the content-addressed cache cannot turn it into
                 a no-op. Ray start-up (``ray.init`` and importing ``ray.data``) is not in the timing; it is
                 printed once on its own line. The first prepare after start-up (cold Ray worker
                 processes, which is what ``raysmol pretrain`` sees) is also printed on its own.
* ``A 1-thread`` one process, one thread (``RAYON_NUM_THREADS=1``): read each file line by line,
                 ``json.loads``, ``Tokenizer.encode`` per document, append EOS, write the same
                 ``train``/``val`` ``.tokens.npy``/``.lens.npy`` outputs (one shard per file).
* ``B batch``    one process, the tokenizer's own multi-threaded ``encode_batch`` on all cores over the
                 same documents, the same writes: the practical limit of one machine.
                 (``--b-method encode_batch_fast`` measures the no-offsets variant raysmol itself calls.)

Baselines run in subprocesses so their thread settings (set before ``tokenizers`` is imported) do not
leak; their interpreter start-up and imports are not timed. Repeats are interleaved (A, B, raysmol, A, ...)
so that load from anything else on the machine hits all three alike; the 1-minute load average before
and after is printed, and numbers taken at a load average well above the core count are noise.
Building the corpus and the tokenizer (cached in ``--cache-dir``) is never timed.

How to read the output: one row per method with tokens, seconds (median of ``--repeat`` runs) and
tokens/s, then the ratios ``raysmol/A`` (goal >= 1.6x on 2 cores) and ``raysmol/B`` (goal >= 0.8x); a
ratio above 1 means raysmol is faster. All three must produce the same number of tokens, and the
script checks that raysmol's shards, concatenated in order, hold exactly the baseline's tokens.

    .venv/bin/python benchmarks/prepare_throughput.py [--repeat 3] [--cache-dir DIR] [--json]

To measure a candidate change without touching raysmol/, copy raysmol/data/prepare.py to a scratch folder,
edit it there and time it in place of the real one (its Ray workers import it through PYTHONPATH):

    PYTHONPATH=/tmp/scratch .venv/bin/python benchmarks/prepare_throughput.py --prepare my_prepare:prepare
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

GOAL_A, GOAL_B = 1.6, 0.8


# ---------------------------------------------------------------- baselines (run in a subprocess)


def _baseline(spec: dict) -> dict:
    """One process: read, parse, tokenize, split, write; the seconds it took, the tokens and their digests."""
    import numpy as np
    from tokenizers import Tokenizer

    method, out_root = spec["method"], Path(tempfile.mkdtemp(prefix="raysmol-bench-base-", dir=spec["tmp"]))
    start = time.perf_counter()
    tok = Tokenizer.from_file(spec["tokenizer_json"])
    eos, dtype, val_cut = spec["eos_id"], np.dtype(spec["dtype"]), int(spec["val_fraction"] * 2**32)
    tokens, written = 0, {}
    for name, path in spec["files"].items():
        docs = []
        with open(path, "rb") as f:
            for raw in f:
                line = raw.decode("utf-8")
                if not line.strip():
                    continue
                text = json.loads(line).get("text")
                if isinstance(text, str) and text.strip():
                    docs.append(text)
        if method == "encode":
            ids = [tok.encode(d, add_special_tokens=False).ids for d in docs]
        elif method == "encode_batch":
            ids = [e.ids for e in tok.encode_batch(docs, add_special_tokens=False)]
        else:
            ids = [e.ids for e in tok.encode_batch_fast(docs, add_special_tokens=False)]
        splits: dict[str, tuple[list[int], list[int]]] = {"train": ([], []), "val": ([], [])}
        for text, seq in zip(docs, ids):
            flat, lens = splits["val" if zlib.crc32(text.encode("utf-8")) < val_cut else "train"]
            flat.extend(seq)
            flat.append(eos)
            lens.append(len(seq) + 1)
        for split, (flat, lens) in splits.items():
            if not lens:
                continue
            d = out_root / name / split
            d.mkdir(parents=True, exist_ok=True)
            arr = np.array(flat, dtype=dtype)
            np.save(d / "000000.tokens.npy", arr)
            np.save(d / "000000.lens.npy", np.array(lens, dtype=np.int32))
            tokens += len(flat)
            written[f"{name}/{split}"] = arr
    seconds = time.perf_counter() - start
    digests = {k: hashlib.sha256(v.tobytes()).hexdigest() for k, v in written.items()}  # untimed
    shutil.rmtree(out_root, ignore_errors=True)
    return {"seconds": [seconds], "tokens": tokens, "digests": digests}


def run_baseline(method: str, threads: int, spec: dict) -> dict:
    env = dict(os.environ)
    env["RAYON_NUM_THREADS"] = str(threads)
    env["TOKENIZERS_PARALLELISM"] = "false" if threads == 1 else "true"
    proc = subprocess.run([sys.executable, __file__, "--_baseline", json.dumps({**spec, "method": method})],
                          env=env, capture_output=True, text=True, check=False)
    if proc.returncode:
        raise RuntimeError(f"baseline {method} failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- raysmol


def _raysmol_digests(prepared) -> dict[str, str]:
    """sha256 of each source/split's shards concatenated in item order (what the baseline wrote as one file)."""
    import numpy as np

    out = {}
    for p in prepared:
        for split in ("train", "val"):
            d = p.split_dir(split)
            m = json.loads((d / "manifest.json").read_text())
            if not m["shards"]:
                continue
            arr = np.concatenate([np.load(d / s["tokens"]) for s in m["shards"]])
            out[f"{p.name}/{split}"] = hashlib.sha256(arr.tobytes()).hexdigest()
    return out


def start_ray(num_cpus: int) -> float:
    """Start a local Ray and import Ray Data; returns the seconds it took (reported, never in raysmol's time)."""
    import logging

    t0 = time.perf_counter()
    import ray
    import ray.data  # noqa: F401  (its import is start-up, not prepare)

    ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    logging.getLogger("ray.data").setLevel(logging.ERROR)
    return time.perf_counter() - t0


def _load_prepare(spec: str):
    import importlib

    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name or "prepare")


def run_raysmol(cfg, tok, tmp: str, digests: bool, prepare_fn: str) -> dict:
    """One timed `prepare` into a fresh data.cache_dir."""
    prepare = _load_prepare(prepare_fn)
    cfg.data.cache_dir = tempfile.mkdtemp(prefix="raysmol-bench-prep-", dir=tmp)
    try:
        start = time.perf_counter()
        prepared = prepare(cfg, tok, show_progress=False)
        seconds = time.perf_counter() - start
        tokens = sum(p.manifest["splits"][s]["tokens"] for p in prepared for s in ("train", "val"))
        return {"seconds": [seconds], "tokens": tokens, "digests": _raysmol_digests(prepared) if digests else {}}
    finally:
        shutil.rmtree(cfg.data.cache_dir, ignore_errors=True)


# ---------------------------------------------------------------- main


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache-dir", default=os.path.join(tempfile.gettempdir(), "raysmol-bench-cache"),
                   help="where the corpus and tokenizer are built once and reused (default: %(default)s)")
    p.add_argument("--repeat", type=int, default=3, help="timed runs of each method; the median is reported")
    p.add_argument("--num-cpus", type=int, default=os.cpu_count() or 1,
                   help="Ray CPUs for raysmol and threads for baseline B (default: all cores, %(default)s)")
    p.add_argument("--b-method", choices=("encode_batch", "encode_batch_fast"), default="encode_batch",
                   help="baseline B's call (default: %(default)s)")
    p.add_argument("--prepare", default="raysmol.data.prepare:prepare", metavar="MODULE:FUNCTION",
                   help="the prepare(cfg, tokenizer, show_progress=) to time (default: %(default)s); point it at a "
                        "scratch copy to measure a candidate change (Ray workers must import it: set PYTHONPATH)")
    p.add_argument("--scale", type=int, default=1,
                   help="repeat each corpus file N times: a larger corpus amortises Ray Data's fixed start-up "
                        "(~1 s of task and executor start) and shows the steady-state rate")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--_baseline", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args._baseline:
        print(json.dumps(_baseline(json.loads(args._baseline))))
        return 0

    from raysmol.config import load_config
    from raysmol.data.corpus import build_default_corpus
    from raysmol.data.tokenizer import resolve_tokenizer

    cache = os.path.abspath(os.path.expanduser(args.cache_dir))
    t = time.perf_counter()
    corpus = build_default_corpus(cache)
    cfg = load_config()
    cfg.data.budget = "all"  # the baselines tokenize whole files; so must the timed preparation
    tok = resolve_tokenizer(cfg.tokenizer.name, cache, builtin_vocab_size=cfg.tokenizer.vocab_size)
    setup_s = time.perf_counter() - t
    # The tiny config's sources, pointed at the corpus files directly: `builtin:` would (re)build the corpus
    # inside every fresh data.cache_dir, inside the timing.
    by_path = {f"builtin:{k}": v for k, v in corpus.items()}
    for s in cfg.data.sources:
        s.path = str(by_path.get(s.path, s.path))
    if args.scale > 1:
        scaled = os.path.join(cache, f"scaled-{args.scale}")
        os.makedirs(scaled, exist_ok=True)
        for s in cfg.data.sources:
            dest = os.path.join(scaled, os.path.basename(s.path))
            if not os.path.exists(dest):
                data = open(s.path, "rb").read()
                with open(dest + ".tmp", "wb") as f:
                    f.write(data * args.scale)
                os.replace(dest + ".tmp", dest)
            s.path = dest
    files = {s.name: s.path for s in cfg.data.sources}
    corpus_bytes = sum(os.path.getsize(f) for f in files.values())
    dtype = "uint16" if tok.vocab_size <= 2**16 else "uint32"
    tmp = tempfile.mkdtemp(prefix="raysmol-bench-")
    spec = {"files": files, "tokenizer_json": str(tok.json_path), "eos_id": tok.eos_id, "dtype": dtype,
            "val_fraction": cfg.data.val_fraction, "tmp": tmp}
    # Repeats are interleaved (A, B, raysmol, A, B, raysmol, ...) so that load from anything else on the
    # machine drifts into all three alike. Ray stays up, idle, while the baselines run.
    import ray

    load_before = os.getloadavg()[0]
    res: dict[str, dict] = {}
    try:
        startup = start_ray(args.num_cpus)
        for r in range(args.repeat):
            runs = {"A": run_baseline("encode", 1, spec),
                    "B": run_baseline(args.b_method, args.num_cpus, spec),
                    "raysmol": run_raysmol(cfg, tok, tmp, digests=r == 0, prepare_fn=args.prepare)}
            for k, v in runs.items():
                if k not in res:
                    res[k] = v
                else:
                    res[k]["seconds"] += v["seconds"]
    finally:
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)
    load_after = os.getloadavg()[0]

    for r in res.values():
        r["median_s"] = statistics.median(r["seconds"])
        r["tokens_per_s"] = r["tokens"] / r["median_s"]
    ray_r, a, b = res["raysmol"], res["A"], res["B"]
    same_tokens = ray_r["tokens"] == a["tokens"] == b["tokens"]
    same_bytes = ray_r["digests"] == a["digests"] == b["digests"]
    ratio_a, ratio_b = ray_r["tokens_per_s"] / a["tokens_per_s"], ray_r["tokens_per_s"] / b["tokens_per_s"]
    # The first prepare after ray.init is what `raysmol pretrain` sees: its workers start cold.
    first_a, first_b = a["median_s"] / ray_r["seconds"][0], b["median_s"] / ray_r["seconds"][0]
    report = {
        "corpus": {"files": files, "bytes": corpus_bytes, "tokenizer": str(tok.json_path)},
        "prepare": args.prepare, "cpus": args.num_cpus, "repeat": args.repeat, "setup_s_untimed": setup_s,
        "ray_startup_s": startup, "load_avg_1m": [load_before, load_after],
        "methods": {k: {kk: v[kk] for kk in ("tokens", "seconds", "median_s", "tokens_per_s")} for k, v in res.items()},
        "ratio_raysmol_over_A": ratio_a, "ratio_raysmol_over_B": ratio_b,
        "first_run_ratio_raysmol_over_A": first_a, "first_run_ratio_raysmol_over_B": first_b,
        "goal_A": GOAL_A, "goal_B": GOAL_B, "meets_goal_A": ratio_a >= GOAL_A, "meets_goal_B": ratio_b >= GOAL_B,
        "same_token_count": same_tokens, "same_tokens": same_bytes,
    }
    if args.json:
        print(json.dumps(report, indent=1))
        return 0
    print(f"corpus: {len(files)} JSONL files, {corpus_bytes / 1e6:.1f} MB; {args.num_cpus} CPUs; "
          f"median of {args.repeat} interleaved runs (corpus+tokenizer setup {setup_s:.1f}s, untimed); "
          f"load avg {load_before:.1f} -> {load_after:.1f}")
    print(f"ray start-up (one-off, not in raysmol's time): {startup:.2f}s")
    print(f"{'method':<28}{'tokens':>12}{'seconds':>10}{'tokens/s':>14}   runs")
    default_prepare = p.get_default("prepare")
    name = "raysmol prepare" if args.prepare == default_prepare else args.prepare.split(":")[0].rsplit(".", 1)[-1]
    labels = {"raysmol": f"{name} ({args.num_cpus} CPUs)", "A": "A: 1 thread, encode",
              "B": f"B: {args.b_method}, {args.num_cpus} thr"}
    for k in ("raysmol", "A", "B"):
        r = res[k]
        print(f"{labels[k]:<28}{r['tokens']:>12,}{r['median_s']:>10.2f}{r['tokens_per_s']:>14,.0f}   "
              + " ".join(f"{s:.2f}" for s in r["seconds"]))
    print(f"raysmol/A = {ratio_a:.2f}x (goal >= {GOAL_A}x: {'met' if ratio_a >= GOAL_A else 'MISSED'})")
    print(f"raysmol/B = {ratio_b:.2f}x (goal >= {GOAL_B}x: {'met' if ratio_b >= GOAL_B else 'MISSED'})")
    print(f"raysmol's first (cold-worker) run alone: {ray_r['seconds'][0]:.2f}s, "
          f"raysmol/A = {first_a:.2f}x, raysmol/B = {first_b:.2f}x")
    print(f"same tokens in all three outputs: {'yes' if same_bytes else 'NO'}"
          + ("" if same_tokens else f" (counts differ: {ray_r['tokens']}, {a['tokens']}, {b['tokens']})"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
