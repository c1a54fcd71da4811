"""The `mars` command line.

  mars reproduce [--model SPEC] [--out DIR] [--fresh] [--quick] [--quiet]   every analysis, figure and table
  mars analyze   [--model SPEC] [--out DIR] [--fresh] [--quick] [--quiet]   the analyses only (DIR/data/*.nc)
  mars figures   [--out DIR]                                   the same figures from DIR/data/*.nc
  mars extract   [--model SPEC] [--harmful F --harmless F] --out P   text refusal directions
  mars steer     [--model SPEC] --prompt T [--image F] [--method M] [--mars DIR | --directions P]
  mars smoke     [--family F]                                  a tiny random model, end to end
  mars evaluate  --benchmark NAME=PATH [--methods M,..] [--judge J]  methods x benchmarks, judged

`--model` takes every spec of `analysis.models` (default: the built-in organism; organism:VARIANT,
organism:RUN_DIR, organism:smol[:RUN_DIR], tiny:FAMILY, a hub id or a local directory). Prompt files hold one prompt per
line, or a JSON list of strings. Every command that runs a model takes `--remote` (run its traces
on NDIF: a hub --model and NDIF_API_KEY in the environment) and `--remote local` (the same
requests serialized and run in this process; see docs/ndif.md). Errors are one line naming the
problem and the fix (exit 2); Ctrl-C says how to resume (exit 130).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from mars_core._version import __version__
from mars_core.errors import InputError, MarsError
from mars_core.remote import add_remote_args, redact, remote_failure, remote_from_args


def _log(msg: str) -> None:
    print(msg, flush=True)


def _settings(args):
    from .reproduce import Settings

    st = Settings.quick() if getattr(args, "quick", False) else Settings()
    return dataclasses.replace(st, seed=args.seed)


def check_writable(out: str | Path) -> Path:
    """`out` as a folder this process can write into (created if missing); InputError otherwise.
    Called before any model work."""
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".mars-write-check.", dir=out)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise InputError(f"cannot write to --out {str(out)!r} ({e.strerror or e}); choose a folder you can "
                         "write to") from None
    return out


def _quiet_libraries() -> None:
    """No progress bars of weight loading and no per-call warnings from the libraries below us."""
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")


def _reproduce(args, figures: bool = True) -> int:
    from .reproduce import model_study, run

    out = check_writable(args.out)
    mode = remote_from_args(args)  # checks the key and the model id before anything loads
    _quiet_libraries()
    t0 = time.perf_counter()
    study = model_study(args.model, out, fresh=args.fresh, settings=_settings(args), log=_log, remote=mode,
                        dtype=args.dtype, device_map=args.device_map)
    written = run(study, figures=figures, progress=not args.quiet)
    _log(f"{len(written)} artifacts under {out.resolve()} in {time.perf_counter() - t0:.0f} s")
    return 0


def _figures(args) -> int:
    from .reproduce import write_figures

    check_writable(Path(args.out) / "figures")
    written = write_figures(Path(args.out), log=_log)
    _log(f"{len(written)} figure and table files")
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


def _model(args):
    """The model for `args` (--model, --dtype, --device-map, --remote), through the one resolver."""
    from .models import open_model

    mode = remote_from_args(args)  # checks the key and the model id before anything loads
    _quiet_libraries()
    return open_model(args.model, dtype=args.dtype, device_map=args.device_map, remote=mode, seed=args.seed)


def _extract(args) -> int:
    from mars_core.directions import RefusalDirections

    out = Path(args.out)
    check_writable(out.parent if str(out.parent) else Path("."))
    if bool(args.harmful) != bool(args.harmless):
        raise InputError("give both --harmful and --harmless, or neither (the model's built-in prompts)")
    harmful = _read_prompts(args.harmful) if args.harmful else None
    harmless = _read_prompts(args.harmless) if args.harmless else None
    mm = _model(args)
    if harmful is None:
        from .reproduce import default_suite

        suite = default_suite(args.model, mm, args.seed)
        harmful, harmless = suite["harmful_text_train"].texts, suite["harmless_text_train"].texts
    dirs = RefusalDirections.extract(mm, harmful, harmless, seed=args.seed)
    path = dirs.save(out)
    _log(f"wrote {path}: {dirs.n_layers} layers x {len(dirs.positions)} positions, d_model={dirs.d_model}")
    return 0


def _fitted_mars(args, mm):
    """The MARS operator `mars steer` uses: loaded from --mars (a folder `MARS.save` wrote, or a
    `mars reproduce` output holding data/mars), else fitted here on the model's own text and
    safe sets (saying so), through the same cached steps as `mars reproduce --out`."""
    from mars_core.errors import ArtifactError
    from mars_core.steering import MARS

    if args.mars:
        p = Path(args.mars)
        for cand in (p, p / "data" / "mars"):
            if (cand / "mars.json").is_file():
                op = MARS.load(cand, model=mm)
                _log(f"loaded the fitted MARS from {cand}: layer {op.layer}, gate {op.gate}")
                return op
        raise ArtifactError(f"no fitted MARS at {p}: give a folder MARS.save wrote or a `mars reproduce --out` "
                            "folder (it holds data/mars)")
    from .cache import StepCache
    from .graph import run_steps
    from .reproduce import default_suite, study_sources
    from .steps import STEPS

    out = check_writable(args.out)
    _log(f"no fitted MARS given (--mars): fitting its layer and gate on {mm.model_id}'s text and safe calibration "
         f"sets (the steps of `mars reproduce`, cached in {out / '.mars_cache'})")
    sources = study_sources(mm, default_suite(args.model, mm, args.seed), _settings(args))
    op = run_steps(STEPS, sources, StepCache(out / ".mars_cache"), targets=["mars"])["mars"]
    _log(f"fitted MARS: layer {op.layer}, gate {op.gate}")
    return op


def _steer(args) -> int:
    from mars_core.directions import RefusalDirections
    from mars_core.steering import ActAdd, NoSteer

    if args.image and not Path(args.image).is_file():
        raise InputError(f"--image {args.image!r} does not exist; give an image file")
    mm = _model(args)
    images = [args.image] if args.image else None
    if args.method == "none":
        st, where = NoSteer(), "unsteered"
    elif args.method == "actadd":
        if args.directions:
            dirs = RefusalDirections.load(args.directions, model=mm)
            layer = args.layer if args.layer is not None else mm.n_layers // 2
            st = ActAdd.from_directions(dirs, layer, args.strength, layers_path=mm.family.layers_path)
        else:
            op = _fitted_mars(args, mm)
            layer = args.layer if args.layer is not None else op.layer
            at = op.calibration.at(layer)
            st = ActAdd(at["r"], layer, args.strength * at["gap"], layers_path=mm.family.layers_path)
        where = f"at layer {st.layer}, strength {args.strength:g} x text gap"
    else:
        op = _fitted_mars(args, mm)
        st = op if args.method == "mars" else op.variant(recenter=False)
        if args.layer is not None:
            st = st.variant(layer=args.layer)
        where = f"at layer {st.layer}, gate {st.gate}"
    gens = st.generate(mm, [args.prompt], images=images, max_new_tokens=args.max_new_tokens)
    alpha = "" if gens.alpha is None else f" (strength applied: {float(gens.alpha[0]):.3g})"
    _log(f"{args.method} {where}{alpha}: {gens[0]!r}")
    return 0


def _smoke(args: argparse.Namespace) -> int:
    import torch

    from mars_core.capture import collect_activations
    from mars_core.loading import load_model
    from mars_core.testing import build_tiny, make_image

    torch.manual_seed(0)
    mode = remote_from_args(args, ndif_ok=False)  # a model built here: NDIF cannot host it
    t0 = time.perf_counter()
    tiny = build_tiny(args.family)
    mm = load_model(tiny.model, tiny.processor or tiny.tokenizer, remote=mode, model_id=f"tiny:{args.family}")
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


MODEL_HELP = ("organism (default: the built-in toy organism), organism:VARIANT (natural, offset, video), "
              "organism:RUN_DIR (a training run of mars_core.organism.train), organism:smol (the SmolLM2-135M "
              "organism), organism:smol:RUN_DIR, tiny:FAMILY, a hub id or a local directory")


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help=MODEL_HELP)
    add_remote_args(p)
    p.add_argument("--dtype", default=None, help="e.g. bfloat16 (hub models)")
    p.add_argument("--device-map", default=None, help='e.g. "auto" (hub models)')
    p.add_argument("--seed", type=int, default=0)


def build_parser() -> argparse.ArgumentParser:
    from mars_core.testing import FAMILIES_MULTIMODAL, FAMILIES_TEXT

    from .cli_evaluate import register as register_evaluate

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
        s.add_argument("--quiet", action="store_true", help="no progress bar")
        s.set_defaults(func=func)

    s = sub.add_parser("figures", help="the figures and tables of OUT/data/*.nc (exactly those reproduce writes)")
    s.add_argument("--out", default=".", help="directory holding data/ (figures go to OUT/figures)")
    s.set_defaults(func=_figures)

    s = sub.add_parser("extract", help="text refusal directions to a safetensors file")
    _model_args(s)
    s.add_argument("--harmful", help="harmful prompts file (default: the model's built-in prompts)")
    s.add_argument("--harmless", help="harmless prompts file")
    s.add_argument("--out", required=True, help="output .safetensors path")
    s.set_defaults(func=_extract)

    s = sub.add_parser("steer", help="generate for one prompt with a steering method")
    _model_args(s)
    s.add_argument("--prompt", required=True)
    s.add_argument("--image", default=None, help="image file")
    s.add_argument("--method", choices=("none", "actadd", "mars", "mars_no_recenter"), default="mars")
    s.add_argument("--mars", default=None,
                   help="a fitted MARS: a folder MARS.save wrote, or a `mars reproduce --out` folder (default: fit "
                        "one here on the model's own text and safe sets, cached under --out)")
    s.add_argument("--directions", default=None, help="directions file from `mars extract` (ActAdd)")
    s.add_argument("--layer", type=int, default=None, help="override the layer (default: the fitted MARS's)")
    s.add_argument("--strength", type=float, default=1.0, help="ActAdd strength (x text mean-difference norm)")
    s.add_argument("--max-new-tokens", type=int, default=16)
    s.add_argument("--out", default=".", help="where a MARS fitted here is cached (default: .)")
    s.set_defaults(func=_steer)

    s = sub.add_parser("smoke", help="load a tiny built-in random model and capture activations")
    s.add_argument("--family", default="llava", choices=sorted(FAMILIES_MULTIMODAL + FAMILIES_TEXT),
                   help="tiny model family (default: llava)")
    add_remote_args(s)
    s.set_defaults(func=_smoke)

    register_evaluate(sub, _model_args)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        print("\nmars: error: give a command (e.g. `mars reproduce`)", file=sys.stderr)
        return 2
    try:
        return int(args.func(args) or 0)
    except MarsError as e:
        print(f"mars {args.command}: error: {redact(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        out = getattr(args, "out", None)
        hint = (f"finished steps are cached under {Path(out) / '.mars_cache'}; rerun the same command to resume"
                if out else "nothing was saved")
        print(f"\nmars {args.command}: interrupted; {hint}", file=sys.stderr)
        return 130
    except Exception as e:  # a failed remote request: one line, not a traceback
        msg = remote_failure(e, args.remote) if getattr(args, "remote", None) else None
        if msg is None:
            raise
        print(f"mars {args.command}: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
