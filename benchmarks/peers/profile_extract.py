"""Where the package's extract time goes (issue 14, item 2: profile a missed target; report only).

    python benchmarks/peers/profile_extract.py [--n 16] [--reps 3] [--cprofile]

On SmolLM2-135M-Instruct, 1 torch thread, the same prompts as benchmarks/peers.py. Times, each
interleaved (ABBA) with a plain `output_hidden_states` forward of the same prebuilt batches, the
pieces of `RefusalDirections.extract`:
  extract          RefusalDirections.extract end to end (strings in)
  build_batch      mm.build_batch for every batch (chat template, tokenizer, post-position check)
  _read            the collector's per-batch trace on prebuilt batches (all layers, post positions,
                   float64 row sums), as collect_activations runs it
  _read no_grad    the same under torch.no_grad()
  empty trace      an nnsight trace that reads nothing (the fixed per-trace cost)
  hooks            forward hooks doing the same reads (the baseline)
  plain wrapped    a plain forward of the nnsight-wrapped model outside any trace
--cprofile prints the top functions of one extract call by cumulative and own time.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(HERE.parents[1]))

import common  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--cprofile", action="store_true")
    a = ap.parse_args()
    common.set_threads(1)
    import torch

    import mars_core
    from mars_core import RefusalDirections
    from mars_core.capture import _read
    from mars_core.organism.smol.base import base_dir

    sys.path.insert(0, str(HERE.parent))
    from peers import prompts  # noqa: E402

    spec = {"model_dir": str(base_dir())}
    model, tok = common.load_model(spec)
    plain_model, _ = common.load_model(spec)
    mm = mars_core.load_model(model, tok)
    harmful, harmless = prompts(a.n)
    bs = a.batch_size
    texts = harmful + harmless
    chunks = [harmful[i:i + bs] for i in range(0, len(harmful), bs)] + [harmless[i:i + bs] for i in range(0, len(harmless), bs)]
    built = [mm.build_batch(c) for c in chunks]
    pos = built[0].post_positions
    layers = list(range(mm.n_layers))

    def plain():
        with torch.no_grad():
            for b in built:
                plain_model(**b.inputs, output_hidden_states=True)

    def extract():
        RefusalDirections.extract(mm, harmful, harmless, positions="post", batch_size=bs, progress=False)

    def build():
        for c in chunks:
            mm.build_batch(c)

    def read():
        for b in built:
            _read(mm, b, layers, pos, "mean", False)

    def read_ng():
        with torch.no_grad():
            read()

    def empty():
        for b in built:
            with mm.nn.trace(b.inputs):
                pass

    def plain_wrapped():
        with torch.no_grad():
            for b in built:
                model(**b.inputs)

    sys.path.insert(0, str(HERE))
    import run_hooks

    hook_batches = {"harmful": [{"input_ids": b.inputs["input_ids"], "attention_mask": b.inputs["attention_mask"]}
                                for b in built[:len(built) // 2]],
                    "harmless": [{"input_ids": b.inputs["input_ids"], "attention_mask": b.inputs["attention_mask"]}
                                 for b in built[len(built) // 2:]], "positions": list(pos)}
    hooks = run_hooks.prepare_extract(spec, plain_model, tok, hook_batches)["extract"]

    fns = {"extract": extract, "build_batch": build, "_read": read, "_read no_grad": read_ng,
           "empty trace": empty, "hooks": hooks, "plain wrapped": plain_wrapped}
    import os

    print(f"load average {os.getloadavg()[0]:.2f}; {len(texts)} prompts, {len(built)} batches of {bs}, {mm.n_layers} layers, {len(pos)} positions; "
          f"{a.reps} reps, cpu clock (process_time), each against a plain forward of the same batches")
    for name, fn in fns.items():
        t = common.interleaved({"x": fn, "plain": plain}, a.reps, warmup=1)
        x, p = statistics.median(t["x"]["cpu"]), statistics.median(t["plain"]["cpu"])
        r = statistics.median(u / v for u, v in zip(t["x"]["cpu"], t["plain"]["cpu"]))
        print(f"  {name:<14} {x:7.3f} s  plain {p:7.3f} s  ratio {r:.3f}  per batch {1e3 * (x - p) / len(built):+7.1f} ms "
              "vs plain" + (f" ({1e3 * x / len(built):.1f} ms a batch)" if name == "build_batch" else ""), flush=True)
    if a.cprofile:
        import cProfile
        import pstats

        pr = cProfile.Profile()
        pr.enable()
        extract()
        pr.disable()
        st = pstats.Stats(pr)
        st.sort_stats("cumulative").print_stats(30)
        st.sort_stats("tottime").print_stats(20)


if __name__ == "__main__":
    main()
