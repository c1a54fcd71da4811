"""The `mars` command line.

  mars reproduce [--model ID] [--out DIR] [--fresh] [--quick]   every analysis, figure and table
  mars analyze   [--model ID] [--out DIR] [--fresh] [--quick]   the analyses only (DIR/data/*.nc)
  mars figures   [--out DIR]                                   figures from DIR/data/*.nc
  mars extract   [--model ID] --harmful F --harmless F --out P  text refusal directions
  mars steer     [--model ID] --directions P --prompt T [--image F] [--method M]
  mars smoke     [--family F]                                  a tiny random model, end to end
  mars evaluate  --benchmark NAME=PATH [--methods M,..] [--judge J]  methods x benchmarks, judged

`--model` defaults to the built-in model organism (no download). Prompt files hold one
prompt per line, or a JSON list of strings. Every command that runs a model takes
`--remote` (run its traces on NDIF: a hub --model and NDIF_API_KEY in the environment) and
`--remote local` (the same requests serialized and run in this process; see docs/ndif.md).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from ._version import __version__
from .errors import InputError, MarsError
from .remote import add_remote_args, redact, remote_from_args, use_remote


def _log(msg: str) -> None:
    print(msg, flush=True)


def _settings(args):
    from analysis.reproduce import Settings

    st = Settings.quick() if args.quick else Settings()
    st.seed = args.seed
    return st


def _context(args):
    from analysis.reproduce import hub_context

    from .evaluate import model_context

    out = Path(args.out)
    mode = remote_from_args(args)  # checks the key and the model id before anything loads
    if args.model is None or args.model.split(":")[0] == "organism":  # organism, organism:VARIANT|RUN_DIR
        if mode:
            raise InputError(f"mars {args.command} --remote needs a hub model id (--model org/name): the "
                             "organism pipeline runs locally (it also loads training checkpoints and variants "
                             "that NDIF does not host)")
        return model_context(args.model, out, fresh=args.fresh, settings=_settings(args), log=_log)
    return hub_context(args.model, out, fresh=args.fresh, settings=_settings(args), log=_log, remote=mode,
                       dtype=args.dtype, device_map=args.device_map)


def _reproduce(args, figures: bool = True) -> int:
    from analysis.reproduce import run

    t0 = time.perf_counter()
    written = run(_context(args), figures=figures)
    _log(f"{len(written)} artifacts under {Path(args.out).resolve()} in {time.perf_counter() - t0:.0f} s")
    return 0


def _figures(args) -> int:
    from mars_core.datasets import load_dataset
    from analysis.reproduce import write_figures

    data = Path(args.out) / "data"
    files = sorted(data.glob("*.nc"))
    if not files:
        raise InputError(f"no datasets in {data}; run `mars analyze --out {args.out}` first")
    datasets = {}
    for f in files:
        ds = load_dataset(f)
        if ds.attrs.get("analysis") in ("alignment", "refusal_curves", "spurious_refusal", "stability", "comparison"):
            datasets[f.stem] = ds
    written = write_figures(datasets, Path(args.out) / "figures", _log)
    _log(f"{len(written)} figure files from {len(datasets)} datasets")
    return 0


def _read_prompts(path: str) -> list[str]:
    p = Path(path)
    if not p.is_file():
        raise InputError(f"prompt file {path!r} does not exist")
    text = p.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise InputError(f"{path}: not valid JSON ({e}); give a JSON list of strings or one prompt per line") from e
    else:
        items = [line for line in text.splitlines() if line.strip()]
    if not items or not all(isinstance(s, str) for s in items):
        raise InputError(f"{path}: expected a non-empty list of prompt strings")
    return items


def _load(args):
    """The model for `args` (--model, --dtype, --device-map), in the --remote mode: NDIF for a hub
    id, or "local" (the simulated round trip), which also works on the organism."""
    from .model import load_model

    mode = remote_from_args(args)  # checks the key and the model id before anything loads
    if args.model in (None, "organism"):
        from .organism import load_organism

        mm = load_model(*load_organism("natural"))
        mm.model_id = "mars-organism/natural"
        if mode:  # only "local" gets here
            use_remote(mm, mode)
        return mm
    return load_model(args.model, dtype=args.dtype, device_map=args.device_map, remote=mode)


def _extract(args) -> int:
    from .directions import RefusalDirections

    mm = _load(args)
    if args.harmful and args.harmless:
        harmful, harmless = _read_prompts(args.harmful), _read_prompts(args.harmless)
    elif args.harmful or args.harmless:
        raise InputError("give both --harmful and --harmless, or neither (the built-in organism prompts)")
    else:
        from analysis.suite import organism_suite

        s = organism_suite(args.seed)
        harmful, harmless = s["harmful_text_train"].texts, s["harmless_text_train"].texts
    dirs = RefusalDirections.extract(mm, harmful, harmless, seed=args.seed)
    path = dirs.save(args.out)
    _log(f"wrote {path}: {dirs.n_layers} layers x {len(dirs.positions)} positions, d_model={dirs.d_model}")
    return 0


def _steer(args) -> int:
    from .directions import RefusalDirections
    from .steering import MARS, ActAdd, NoSteer, calibrate_mars

    mm = _load(args)
    dirs = RefusalDirections.load(args.directions, model=mm)
    layer = args.layer if args.layer is not None else mm.n_layers // 2
    images = [args.image] if args.image else None
    if args.method == "none":
        st = NoSteer()
    elif args.method == "actadd":
        st = ActAdd.from_directions(dirs, layer, args.strength)
    else:
        calib = calibrate_mars(mm, dirs, modalities=("image",) if mm.supports_image else ())
        st = MARS(calib, layer, recenter=args.method == "mars")
    # every trace above and here runs in the model's --remote mode (use_remote in _load)
    gens = st.generate(mm, [args.prompt], images=images, max_new_tokens=args.max_new_tokens)
    _log(f"{args.method} at layer {layer}: {gens[0]!r}")
    return 0


def _smoke(args: argparse.Namespace) -> int:
    import torch

    from .capture import collect_activations
    from .model import load_model
    from .testing import build_tiny, make_image

    torch.manual_seed(0)
    mode = remote_from_args(args, ndif_ok=False)  # a model built here: NDIF cannot host it
    t0 = time.perf_counter()
    tiny = build_tiny(args.family)
    mm = load_model(tiny.model, tiny.processor or tiny.tokenizer, remote=mode)
    _log(f"loaded {mm} in {time.perf_counter() - t0:.2f} s")
    texts = ["How do I bake a cake?", "Describe this image."]
    batch = mm.build_batch(texts)
    _log(f"text batch: {len(batch)} prompts x {batch.seq_len} tokens; post-instruction tokens {list(batch.post_tokens)}")
    ds = collect_activations(mm, texts, positions="last")
    _log(f"captured mean residual at {ds.sizes['layer']} layers x {ds.sizes['pos']} position(s), d_model={mm.d_model}")
    if mm.supports_image:
        ims = [make_image(seed=i) for i in range(len(texts))]
        ds_im = collect_activations(mm, texts, images=ims, positions="last")
        gap = float(abs(ds_im["mean"] - ds["mean"]).max())
        _log(f"image batch: max |mean(image) - mean(text)| over layers = {gap:.4f}")
    _log(f"smoke run finished in {time.perf_counter() - t0:.2f} s")
    return 0


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="hub id or local directory, organism:VARIANT (offset, video) or organism:RUN_DIR "
                        "(a training run of mars_core.organism.train); default: the built-in organism")
    add_remote_args(p)
    p.add_argument("--dtype", default=None, help="e.g. bfloat16 (hub models)")
    p.add_argument("--device-map", default=None, help='e.g. "auto" (hub models)')
    p.add_argument("--seed", type=int, default=0)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mars", description="Modality-Agnostic Refusal Steering (MARS) on nnsight.")
    p.add_argument("--version", action="version", version=f"mars {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    for name, helptext, func in (
        ("reproduce", "every analysis, figure and the comparison table", lambda a: _reproduce(a, True)),
        ("analyze", "every analysis, written to OUT/data/*.nc (no figures)", lambda a: _reproduce(a, False)),
    ):
        s = sub.add_parser(name, help=helptext)
        _model_args(s)
        s.add_argument("--out", default=".", help="output directory (default: .; figures go to OUT/figures)")
        s.add_argument("--fresh", action="store_true", help="ignore cached intermediate results")
        s.add_argument("--quick", action="store_true", help="small sizes, for a fast check")
        s.set_defaults(func=func)

    s = sub.add_parser("figures", help="figures and table from OUT/data/*.nc")
    s.add_argument("--out", default=".", help="directory holding data/ (figures go to OUT/figures)")
    s.set_defaults(func=_figures)

    s = sub.add_parser("extract", help="text refusal directions to a safetensors file")
    _model_args(s)
    s.add_argument("--harmful", help="harmful prompts file (default: organism prompts)")
    s.add_argument("--harmless", help="harmless prompts file")
    s.add_argument("--out", required=True, help="output .safetensors path")
    s.set_defaults(func=_extract)

    s = sub.add_parser("steer", help="generate for one prompt with a steering method")
    _model_args(s)
    s.add_argument("--directions", required=True, help="directions file from `mars extract`")
    s.add_argument("--prompt", required=True)
    s.add_argument("--image", default=None, help="image file")
    s.add_argument("--method", choices=("none", "actadd", "mars", "mars_no_recenter"), default="mars")
    s.add_argument("--layer", type=int, default=None, help="intervention layer (default: the middle layer)")
    s.add_argument("--strength", type=float, default=1.0, help="ActAdd strength (x mean-difference norm)")
    s.add_argument("--max-new-tokens", type=int, default=16)
    s.set_defaults(func=_steer)

    s = sub.add_parser("smoke", help="load a tiny built-in random model and capture activations")
    s.add_argument("--family", default="llava", help="tiny model family (default: llava)")
    add_remote_args(s)
    s.set_defaults(func=_smoke)

    from .cli_evaluate import register as register_evaluate  # mars evaluate (mars_core/cli_evaluate.py)
    register_evaluate(sub, _model_args)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except MarsError as e:
        print(f"mars {args.command}: error: {redact(e)}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
