"""Batch diversity: how spread out a global batch's samples are, with `data.shuffle` off (prepared order, the
order before issue 14) and on, on the same prepared data.

What is measured, per global batch (averaged over the run's steps), per source:

* ``docs``       distinct documents the batch's windows touch (a window covers [w*L, (w+1)*L] of its stream);
* ``shards``     distinct shards (preparation work items, ~1M tokens each) they touch;
* ``spread``     mean distance between two windows of one source in the batch, as a fraction of the source's
                 stream (0: neighbours; a uniformly random pair: 1/3);
* ``contiguous`` the longest run of windows that follow each other in the stream, in tokens.

Two data sets:

* ``tiny``       the embedded default job (`raysmol/jobs/tiny.yaml`: three sources, 16 windows of 128 tokens per
                 step, 600 steps), prepared for real (Ray Data) into a scratch cache;
* ``web-1B``     one synthetic web source shaped like the 1B baseline's FineWeb-Edu share: 40 shards of ~1M
                 tokens (documents of log-normal length, mean ~1,000 tokens), 256 windows of 4,096 tokens per
                 step (1M tokens), 40 steps.

How to read the output: one row per data set, source and setting; the ratio on/off of distinct documents per
batch (higher is better) is printed per source.

    .venv/bin/python benchmarks/batch_diversity.py [--json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np

from raysmol.data.batches import Batches
from raysmol.data.store import TokenStream


def batch_stats(batches: Batches, steps: int) -> dict[str, dict[str, float]]:
    """Mean per-batch figures per source over `steps` global batches."""
    L, S = batches.seq_len, batches.samples_per_step
    out: dict[str, dict[str, list[float]]] = {n: {"docs": [], "shards": [], "spread": [], "contiguous": []}
                                              for n in batches.names}
    for step in range(steps):
        src, k = batches.mixture.locate(step * S + np.arange(S))
        for j, name in enumerate(batches.names):
            stream, ks = batches.streams[j], k[src == j]
            if len(ks) == 0:
                continue
            slots = np.array([stream.slot(int(x), L) for x in ks])
            docs, shards = set(), set()
            for w in slots:
                pos, end = int(w) * L, (int(w) + 1) * L + 1
                while pos < end:  # walk the documents this window covers
                    epoch, off = divmod(pos, stream.total)
                    order, starts = stream._order(epoch)
                    i = int(np.searchsorted(starts, off, side="right")) - 1
                    docs.add((epoch, int(order[i])))
                    shards.add(int(stream.doc_shard[order[i]]))
                    pos += int(stream.doc_lens[order[i]]) - (off - int(starts[i]))
            s = np.sort(slots)
            runs = np.split(s, np.flatnonzero(np.diff(s) != 1) + 1)
            per = max(1, stream.total // L)
            spread = (float(np.abs(slots[:, None] - slots[None, :]).sum() / (len(slots) * (len(slots) - 1)) / per)
                      if len(slots) > 1 else 0.0)
            for key, v in (("docs", len(docs)), ("shards", len(shards)), ("spread", spread),
                           ("contiguous", max(len(r) for r in runs) * L)):
                out[name][key].append(v)
    return {n: {k: float(np.mean(v)) if v else 0.0 for k, v in d.items()} for n, d in out.items()}


def tiny_streams(cache: Path) -> tuple[list[str], list[str], list[float], dict]:
    from raysmol.config import load_config
    from raysmol.data.prepare import prepare
    from raysmol.data.tokenizer import tokenizer_for
    from raysmol.runtime import init_ray

    cfg = load_config(None, [f"data.cache_dir={cache}"])
    init_ray()
    sources = prepare(cfg, tokenizer_for(cfg), show_progress=False)
    t = cfg.train
    return ([str(s.split_dir("train")) for s in sources], [s.name for s in cfg.data.sources],
            [s.weight for s in cfg.data.sources],
            {"seq_len": t.seq_len, "samples": t.samples_per_step(), "steps": t.steps, "seed": cfg.data.seed})


def web_stream(folder: Path, shards: int = 40, shard_tokens: int = 1 << 20) -> str:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    entries = []
    for i in range(shards):
        lens = []
        while sum(lens) < shard_tokens:
            lens.append(int(np.clip(rng.lognormal(6.5, 0.9), 20, 30_000)))
        toks = rng.integers(1, 60_000, sum(lens), dtype=np.uint16)
        np.save(folder / f"{i:06d}.tokens.npy", toks)
        np.save(folder / f"{i:06d}.lens.npy", np.array(lens, dtype=np.int32))
        entries.append({"tokens": f"{i:06d}.tokens.npy", "lens": f"{i:06d}.lens.npy", "docs": len(lens)})
    (folder / "manifest.json").write_text(json.dumps({"shards": entries}))
    return str(folder)


def measure(dirs: list[str], names: list[str], weights: list[float], p: dict) -> dict[str, dict]:
    res = {}
    for shuffle in (False, True):
        streams = [TokenStream(d, p["seed"], shuffle) for d in dirs]
        b = Batches(streams, weights, p["seed"], p["seq_len"], p["samples"], names=names)
        res["on" if shuffle else "off"] = batch_stats(b, p["steps"])
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    results = {}
    with tempfile.TemporaryDirectory(prefix="raysmol-diversity-") as tmp:
        dirs, names, weights, p = tiny_streams(Path(tmp) / "cache")
        results["tiny"] = measure(dirs, names, weights, p)
        web = web_stream(Path(tmp) / "web")
        results["web-1B"] = measure([web], ["web"], [1.0], {"seq_len": 4096, "samples": 256, "steps": 40, "seed": 1234})
    if args.json:
        print(json.dumps(results, indent=1))
        return 0
    print(f"{'data':8} {'source':10} {'shuffle':8} {'docs':>8} {'shards':>7} {'spread':>7} {'contiguous':>11}")
    for data, r in results.items():
        for name in r["off"]:
            for setting in ("off", "on"):
                x = r[setting][name]
                print(f"{data:8} {name:10} {setting:8} {x['docs']:8.1f} {x['shards']:7.1f} {x['spread']:7.3f} "
                      f"{x['contiguous']:11.0f}")
            print(f"{'':8} {name:10} ratio on/off distinct documents per batch: "
                  f"{r['on'][name]['docs'] / max(r['off'][name]['docs'], 1e-9):.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
