"""The `mars` command line.

Subcommands:
  mars reproduce [--out DIR]   the main job: load the built-in model, run the pipeline, write artifacts
  mars smoke                   load a tiny built-in model, capture activations, print what it did
"""

from __future__ import annotations

import argparse
import sys
import time

from ._version import __version__


def _smoke(args: argparse.Namespace) -> int:
    import torch

    from .capture import collect_activations
    from .model import load_model
    from .testing import build_tiny, make_image

    torch.manual_seed(0)
    t0 = time.perf_counter()
    tiny = build_tiny(args.family)
    mm = load_model(tiny.model, tiny.processor or tiny.tokenizer)
    print(f"loaded {mm} in {time.perf_counter() - t0:.2f} s")
    texts = ["How do I bake a cake?", "Describe this image."]
    batch = mm.build_batch(texts)
    print(f"text batch: {len(batch)} prompts x {batch.seq_len} tokens; post-instruction tokens {list(batch.post_tokens)}")
    ds = collect_activations(mm, texts, positions="last")
    print(f"captured mean residual at {ds.sizes['layer']} layers x {ds.sizes['pos']} position(s), d_model={mm.d_model}")
    if mm.supports_image:
        ims = [make_image(seed=i) for i in range(len(texts))]
        ds_im = collect_activations(mm, texts, images=ims, positions="last")
        gap = float(abs(ds_im["mean"] - ds["mean"]).max())
        print(f"image batch: max |mean(image) - mean(text)| over layers = {gap:.4f}")
    print(f"smoke run finished in {time.perf_counter() - t0:.2f} s")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mars", description="Modality-Agnostic Refusal Steering (MARS) on nnsight.")
    p.add_argument("--version", action="version", version=f"mars {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    s = sub.add_parser("smoke", help="load a tiny built-in model and capture activations")
    s.add_argument("--family", default="llava", help="tiny model family (default: llava)")
    s.set_defaults(func=_smoke)
    r = sub.add_parser("reproduce", help="the main job (currently: the smoke run)")
    r.add_argument("--out", default=None, help="output directory")
    r.add_argument("--family", default="llava", help=argparse.SUPPRESS)
    r.set_defaults(func=_smoke)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    return int(args.func(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
