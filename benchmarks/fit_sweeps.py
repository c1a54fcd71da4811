#!/usr/bin/env python
"""Benchmark (issue 14, job "fit MARS"): `fit_mars`'s layer and gate sweeps scored over the
prompt's key/value cache (`PrefixCache`, the default) against the same grid scored by a full
forward per grid point (`reuse_prefix=False`), and optionally by generating tokens per grid
point (`--generate K`: what refusal_direction / AutoSteer-style grids cost; the first step's
logits are the score, so the choice is comparable).

Model: the SmolLM2-135M-Instruct organism (`organism:smol`, seed 0, real weights, offline),
float32, one torch thread. Inputs (from `analysis.reproduce.default_suite`, seed 0): directions
from 64 + 64 training prompts, the neutral calibration, then `fit_mars` on N harmful training
texts, the safe sets harmless_text_train / harmless_image_cal / captions_cal (N each, spread
over the set) and the 48 neutral images, MARS layers --layers, the default gate grids.
Agreement before the ratio counts: the same layer and gate, the layer selection's induced
refusal within 1e-4 log-odds and the gate rates within 1e-6.
Timing: each variant once, in the same process, one after the other (a fit is minutes; the
machine's drift over that span is in the wall/cpu pair printed), both clocks. Target
(PASS/FAIL, exit 1 on FAIL): full forwards / cached >= 5 on the cpu clock.

    python benchmarks/fit_sweeps.py --quick     # 8 prompts a set, layers 9,15,21 (a few minutes)
    python benchmarks/fit_sweeps.py             # 16 prompts a set, layers 3,6,...,27
    python benchmarks/fit_sweeps.py --generate 32   # adds the generation-scored grid (long)
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def generation_scoring(k: int):
    """A `Steerer.last_logits` replacement that generates k tokens (greedy) with the steerer's
    edit and returns the first step's logits at the last prompt column and its record."""
    import nnsight
    import torch

    from mars_core.steering.base import to_cpu

    def last_logits(self, mm, batch, *, remote=False):
        with torch.no_grad():
            with mm.nn.generate(max_new_tokens=k, min_new_tokens=k, do_sample=False) as tracer:
                with tracer.invoke(batch.inputs):
                    rec = nnsight.save({})
                    self.apply(mm, batch, steps=1, record=rec)
                    lg = nnsight.save(mm.logits_envoy.output[:, -1])
        return lg.detach().float().cpu(), to_cpu(rec)

    return last_logits


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--n", type=int, default=None, help="prompts per set (quick 8, full 16)")
    ap.add_argument("--layers", default=None, help="MARS candidate layers (quick 9,15,21; full 3,6,...,27)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--generate", type=int, default=0, help="also score the grid by generating this many tokens")
    a = ap.parse_args(argv)
    n = a.n or (8 if a.quick else 16)
    layers = [int(x) for x in a.layers.split(",")] if a.layers else ([9, 15, 21] if a.quick else list(range(3, 28, 3)))
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import numpy as np

    import mars_core.steering.base as base
    from analysis.reproduce import cap
    from mars_core.steering import PrefixStore, fit_mars, neutral_calibration
    from organism_setup import smol_setup

    mm, s, dirs = smol_setup("fit_sweeps")
    cal = neutral_calibration(mm, dirs, s["neutral_text"], {"image": s["neutral_image"]}, batch_size=32)
    safe = {k: cap(s[k], n) for k in ("harmless_text_train", "harmless_image_cal", "captions_cal")}
    harmful = cap(s["harmful_text_train"], n)
    neutral = {"image": s["neutral_image"]}
    print(f"model {mm.model_id}: fit_mars on {n} harmful texts, safe sets {', '.join(f'{k} {len(v)}' for k, v in safe.items())}, "
          f"{len(neutral['image'])} neutral images, layers {layers}, batches of {a.batch_size}, default gate grids", flush=True)

    store = PrefixStore(mm)  # the cached fit's caches, kept to report their size

    def fit(reuse):
        return fit_mars(mm, cal, harmful, safe, neutral=neutral, layers=layers, batch_size=a.batch_size,
                        reuse_prefix=reuse, prefix_store=store if reuse else None)

    variants = [("cached prefix (package)", True), ("full forward per point", False)]
    if a.generate:
        variants.append((f"generate {a.generate} tokens per point", "generate"))
    res = {}
    for name, how in variants:
        orig = base.Steerer.last_logits
        if how == "generate":
            base.Steerer.last_logits = generation_scoring(a.generate)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                c0, t0 = time.process_time(), time.perf_counter()
                m = fit(how is True)
                res[name] = (m, time.perf_counter() - t0, time.process_time() - c0)
        finally:
            base.Steerer.last_logits = orig
        print(f"  {name}: {res[name][1]:.1f} s wall, {res[name][2]:.1f} s cpu; layer {m.fit_info['layer']}, "
              f"gate {m.fit_info['gate']}", flush=True)
        if how is True:
            print(f"    prompt caches: {len(store)} batches prefilled once, reused {store.hits} times, "
                  f"{store.nbytes / 2**20:.1f} MiB held", flush=True)
            store.clear()

    ref = res[variants[0][0]][0]
    ok = True
    print()
    for name, how in variants[1:]:
        m, wall, cpu = res[name]
        same = m.fit_info["layer"] == ref.fit_info["layer"] and m.fit_info["gate"] == ref.fit_info["gate"]
        d_layer = float(np.nanmax(np.abs(m.selection["induced"].values - ref.selection["induced"].values)))
        d_gate = float(np.nanmax(np.abs(np.nan_to_num(m.gate_selection["rate"].values, nan=0)
                                        - np.nan_to_num(ref.gate_selection["rate"].values, nan=0))))
        agree = same and d_layer <= 1e-4 and d_gate <= 1e-6
        r_cpu, r_wall = cpu / res[variants[0][0]][2], wall / res[variants[0][0]][1]
        print(f"{name} / cached: cpu {r_cpu:.2f}x, wall {r_wall:.2f}x; same choice {same}, "
              f"max |d induced| {d_layer:.2g} log-odds, max |d gate rate| {d_gate:.2g}")
        if how is False:  # the full-forward grid carries the target
            good = agree and r_cpu >= 5.0
            ok &= good
            print(f"target: full forwards / cached >= 5 (cpu) at the same choice: {'PASS' if good else 'FAIL'}")
    sel = ref.selection.attrs.get("fallback", "")
    print(f"(the chosen layer {ref.fit_info['layer']}{' is the selection fallback: ' + sel if sel else ''}; "
          f"gate fallback {ref.fit_info['gate_fallback']})")
    opens = ref.gate_selection["gate_open"]
    print("(the chosen gate opens on " + ", ".join(f"{n} {float(opens.sel(set=n)):.0%}" for n in opens.set.values)
          + " of the safe sets; above half, the gain and trust region, not the gate, keep them from refusing)")
    print(f"overall: {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
