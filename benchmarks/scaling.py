#!/usr/bin/env python
"""Benchmark (issue 14, item 3): time per prompt against the prompt count and the batch size, for
extract and fit MARS, on the SmolLM2 organism (`organism:smol`, seed 0, float32, one torch thread).

Series, each point run once in this process (cpu clock, `process_time`; wall printed too):
  extract / prompts   `RefusalDirections.extract` (all 30 layers, post-instruction positions,
                      batches of 8) from N prompts in all (N/2 harmful + N/2 harmless training
                      requests, distinct, a fixed draw), by default and with share_head=True
                      (`mars_core.headshare`), N = 256, 1024, 4096 (quick: 64, 256)
  extract / batch     the same on 256 prompts (quick 64) at batch sizes 1, 8, 64 (quick
                      1, 4, 16), beside a plain transformers forward (`output_hidden_states`) of
                      the same batches: where batching stops paying, and nnsight's per-trace cost
                      (the ratio to plain) against the batch size
  fit / prompts       `fit_mars` (the package's cached first-token sweeps) on N prompts a set
                      (harmful training texts, the three safe sets, neutral images; a set
                      smaller than N gives all it has), layers
                      9, 15, 21, the default gate grids, batches of 16, N = 8, 16, 32, 64 (quick 4, 8)
  fit / batch         the same at N = 32 (quick 8), batch sizes 4, 8, 16, 32 (quick 4, 16)
Per point: seconds, seconds per prompt, and against the series' first point the growth of the
per-prompt time (<= 1 means the cost grows linearly or better). "batching stops paying": the
smallest batch size within 5% of the lowest per-prompt time. Reported, not judged (no target).
Results also go to --out (JSON) and --plot (PNG: per-prompt time against N and batch size).

    python benchmarks/scaling.py --quick      # a few minutes
    python benchmarks/scaling.py              # about 40 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "benchmarks", ROOT / "benchmarks" / "peers"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))
from common import fmt_table as table  # noqa: E402  (benchmarks/peers/common.py, shared with peers.py)


def timed(fn):
    c0, t0 = time.process_time(), time.perf_counter()
    out = fn()
    return out, time.process_time() - c0, time.perf_counter() - t0


def stops_paying(per_prompt: dict[int, float], within: float = 0.05) -> int:
    """The smallest batch size whose per-prompt time is within `within` of the lowest."""
    best = min(per_prompt.values())
    return min(b for b, t in per_prompt.items() if t <= best * (1 + within))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--series", default="extract,fit", help="comma-separated: extract, fit")
    ap.add_argument("--out", default=None, help="JSON file for the results")
    ap.add_argument("--plot", default=None, help="PNG file: per-prompt time against N and batch size")
    a = ap.parse_args(argv)
    series = {s.strip() for s in a.series.split(",") if s.strip()}
    if not series <= {"extract", "fit"}:
        ap.error(f"--series {a.series}: choose from extract, fit")
    q = a.quick
    ns_ext = [64, 256] if q else [256, 1024, 4096]
    bs_ext = [1, 4, 16] if q else [1, 8, 64]
    n_bs_ext = 64 if q else 256
    ns_fit = [4, 8] if q else [8, 16, 32, 64]
    bs_fit = [4, 16] if q else [4, 8, 16, 32]
    n_bs_fit = 8 if q else 32
    fit_layers = [9, 15, 21]
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    from analysis.reproduce import cap
    from mars_core.directions import RefusalDirections
    from mars_core.organism.smol import data as D
    from mars_core.steering import fit_mars, neutral_calibration
    from organism_setup import smol_setup

    mm, s, dirs = smol_setup("scaling" + (" (quick)" if q else ""))
    from mars_core.provenance import make_provenance

    res: dict = {"quick": q, "model": mm.model_id,
                 "provenance": make_provenance(model_id=mm.model_id, seed=0, torch=torch.__version__,
                                               cpus=os.cpu_count(), load_average=list(os.getloadavg()))}

    def save():  # after every series, so a cut run keeps what it measured
        if a.out:
            from mars_core.provenance import atomic_write_json

            atomic_write_json(a.out, res)

    if "extract" in series:
        rng = random.Random(0)
        n_max = max(ns_ext + [n_bs_ext]) // 2
        harm = [r.text for r in rng.sample(D.combos(D.HARMFUL_TRAIN, D.TEXT_TEMPLATES_TRAIN, True), n_max)]
        safe = [r.text for r in rng.sample(D.combos(D.HARMLESS_TRAIN, D.TEXT_TEMPLATES_TRAIN, False), n_max)]

        def extract(n, bs, share):
            return RefusalDirections.extract(mm, harm[:n // 2], safe[:n // 2], batch_size=bs, progress=False,
                                             share_head=share)

        extract(16, 8, False), extract(16, 8, True)  # warm-up (and the shared head's one check)
        rows, pts = [], []
        def padded_tokens(n, bs):  # the tokens the forwards compute, padding included
            return sum(mm.build_batch(t[i:i + bs]).inputs["input_ids"].numel()
                       for t in (harm[:n // 2], safe[:n // 2]) for i in range(0, n // 2, bs))

        for i, n in enumerate(ns_ext):
            pt = {"n": n, "tokens": padded_tokens(n, 8)}
            for share in ((False, True) if i % 2 == 0 else (True, False)):  # alternate which runs first
                _, cpu, wall = timed(lambda: extract(n, 8, share))
                pt["head" if share else "default"] = {"cpu": cpu, "wall": wall}
            pts.append(pt)
        for pt in pts:
            row = [pt["n"], pt["tokens"]]
            for k in ("default", "head"):
                c, c0 = pt[k]["cpu"], pts[0][k]["cpu"]
                row += [f"{c:.1f} / {pt[k]['wall']:.1f}", f"{1e3 * c / pt['n']:.1f}",
                        f"{(c / pt['n']) / (c0 / pts[0]['n']):.3f}", f"{(c / pt['tokens']) / (c0 / pts[0]['tokens']):.3f}"]
            rows.append(row)
        print("\n== extract against the prompt count (batches of 8, 30 layers, post positions; cpu clock) ==")
        print(table(rows, ["prompts", "padded tokens", "default s cpu / wall", "ms/prompt", "growth", "per token",
                           "share_head s cpu / wall", "ms/prompt", "growth", "per token"]))
        print("growth: ms per prompt / ms per prompt at the first N (<= 1: linear or better); per token: the same per "
              "padded token (prompt lengths differ between draws)", flush=True)
        res["extract_prompts"] = pts
        save()

        n = n_bs_ext
        h2, s2 = harm[:n // 2], safe[:n // 2]
        rows, pts = [], []
        for bs in bs_ext:
            built = [mm.build_batch(t[i:i + bs]) for t in (h2, s2) for i in range(0, len(t), bs)]

            def plain():
                with torch.no_grad():
                    for b in built:
                        mm.hf(**b.inputs, output_hidden_states=True)

            pt = {"batch_size": bs}
            for name, fn in (("plain", plain), ("default", lambda: extract(n, bs, False)),
                             ("head", lambda: extract(n, bs, True))):
                _, cpu, wall = timed(fn)
                pt[name] = {"cpu": cpu, "wall": wall}
            pts.append(pt)
            rows.append([bs] + [f"{1e3 * pt[k]['cpu'] / n:.1f}" for k in ("plain", "default", "head")]
                        + [f"{pt['default']['cpu'] / pt['plain']['cpu']:.3f}", f"{pt['head']['cpu'] / pt['plain']['cpu']:.3f}"])
            print(f"  batch {bs}: done", flush=True)
        print(f"\n== extract against the batch size ({n} prompts; ms per prompt, cpu clock) ==")
        print(table(rows, ["batch", "plain forward", "extract default", "extract share_head", "default / plain",
                           "share_head / plain"]))
        for k in ("plain", "default", "head"):
            print(f"batching stops paying ({k}): batch {stops_paying({p['batch_size']: p[k]['cpu'] for p in pts})} "
                  "(the smallest within 5% of the lowest per-prompt time)")
        res["extract_batch"] = pts
        res["extract_batch_prompts"] = n
        save()

    if "fit" in series:
        cal = neutral_calibration(mm, dirs, s["neutral_text"], {"image": s["neutral_image"]}, batch_size=32)

        def fit(n, bs):
            safe = {k: cap(s[k], n) for k in ("harmless_text_train", "harmless_image_cal", "captions_cal")}
            harmful, neutral = cap(s["harmful_text_train"], n), cap(s["neutral_image"], n)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                m = fit_mars(mm, cal, harmful, safe, neutral={"image": neutral}, layers=fit_layers, batch_size=bs)
            return m, len(harmful) + sum(len(v) for v in safe.values()) + len(neutral)

        rows, pts = [], []
        fit(ns_fit[0], 16)  # warm-up
        for n in ns_fit:
            (m, n_p), cpu, wall = timed(lambda: fit(n, 16))
            pts.append({"n": n, "prompts": n_p, "cpu": cpu, "wall": wall, "layer": m.fit_info["layer"],
                        "gate": m.fit_info["gate"]})
        for pt in pts:
            g = (pt["cpu"] / pt["prompts"]) / (pts[0]["cpu"] / pts[0]["prompts"])
            rows.append([pt["n"], pt["prompts"], f"{pt['cpu']:.1f} / {pt['wall']:.1f}", f"{1e3 * pt['cpu'] / pt['prompts']:.0f}",
                         f"{g:.3f}", pt["layer"], json.dumps(pt["gate"])])
        print(f"\n== fit MARS against the prompt count (layers {fit_layers}, batches of 16; cpu clock) ==")
        print(table(rows, ["N a set", "prompts", "s cpu / wall", "ms/prompt", "growth", "layer", "gate"]))
        print("prompts: the harmful set, the 3 safe sets and the neutral images, each cut to N (a smaller set "
              "gives all it has: captions_cal and neutral_image hold 48); growth as above", flush=True)
        res["fit_prompts"] = pts
        save()

        rows, pts = [], []
        for bs in bs_fit:
            (m, n_p), cpu, wall = timed(lambda: fit(n_bs_fit, bs))
            pts.append({"batch_size": bs, "prompts": n_p, "cpu": cpu, "wall": wall, "layer": m.fit_info["layer"]})
            rows.append([bs, f"{cpu:.1f} / {wall:.1f}", f"{1e3 * cpu / n_p:.0f}", m.fit_info["layer"]])
        print(f"\n== fit MARS against the batch size (N = {n_bs_fit} a set; cpu clock) ==")
        print(table(rows, ["batch", "s cpu / wall", "ms/prompt", "layer"]))
        print(f"batching stops paying: batch {stops_paying({p['batch_size']: p['cpu'] for p in pts})}")
        res["fit_batch"] = pts
        res["fit_batch_n"] = n_bs_fit
        save()

    if a.plot:
        plot(res, a.plot)
    return 0


def plot(res: dict, path: str) -> None:
    """Per-prompt time (ms, cpu clock) against the prompt count and the batch size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [k for k in ("extract_prompts", "extract_batch", "fit_prompts", "fit_batch") if k in res]
    colors = {"plain": "tab:gray", "default": "tab:blue", "head": "tab:orange", "fit": "tab:green"}
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    for ax, k in zip(axes[0], panels):
        pts = res[k]
        if k.startswith("extract"):
            x = [p["n"] if k == "extract_prompts" else p["batch_size"] for p in pts]
            n_of = (lambda p: p["n"]) if k == "extract_prompts" else (lambda p: res["extract_batch_prompts"])
            for name, label in (("plain", "plain forward"), ("default", "extract (default)"), ("head", "extract share_head")):
                if name in pts[0]:
                    ax.plot(x, [1e3 * p[name]["cpu"] / n_of(p) for p in pts], marker="o", label=label,
                            color=colors[name])
        else:
            x = [p["n"] if k == "fit_prompts" else p["batch_size"] for p in pts]
            ax.plot(x, [1e3 * p["cpu"] / p["prompts"] for p in pts], marker="o", label="fit_mars (cached sweeps)",
                    color=colors["fit"])
        ax.set_xscale("log", base=2)
        ax.set_xticks(x, [str(v) for v in x])
        ax.minorticks_off()
        ax.set_xlabel({"extract_prompts": "prompts (harmful + harmless)", "extract_batch": "batch size",
                       "fit_prompts": "prompts per set (N)", "fit_batch": "batch size"}[k])
        ax.set_ylabel("ms per prompt (cpu)")
        ax.set_ylim(bottom=0)
        ax.set_title({"extract_prompts": "extract: prompt count (batch 8)",
                      "extract_batch": f"extract: batch size ({res.get('extract_batch_prompts')} prompts)",
                      "fit_prompts": "fit_mars: prompt count (batch 16)",
                      "fit_batch": f"fit_mars: batch size (N = {res.get('fit_batch_n')} a set)"}[k], fontsize=10)
        ax.legend(fontsize=8)
    fig.suptitle(f"time per prompt, {res['model']} float32, 1 thread" + (" (quick)" if res["quick"] else ""), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
