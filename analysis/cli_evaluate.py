"""`mars evaluate`: methods x benchmarks on one model (`analysis.evaluate`).

  mars evaluate --benchmark figstep=data/FigStep --benchmark mm_vet=data/mm-vet \\
                [--model ID | organism:video | tiny:FAMILY] [--methods none,actadd,mars] [--judge substring]
                [--limit N] [--chunk-size N] [--out DIR] [--fresh] [--quick]
                [--harmful advbench=PATH --harmless alpaca=PATH]

--benchmark NAME=PATH (repeatable): a registered benchmark (`mars_core.benchmarks.registry`)
and the folder of its local copy. --option NAME.KEY=VALUE passes a loader option (e.g.
mm_safetybench.variant=SD). --judge: substring (default), first_token, or guard:PATH (a local
guard checkpoint such as Llama Guard, run with transformers). --model defaults to the organism;
organism:video is its video-capable Video-LLaVA transplant (4 frames per video by default, 6 at most);
tiny:FAMILY is a tiny random model of a family (`mars_core.testing.build_tiny`), for smoke tests.
--harmful / --harmless NAME=PATH (repeatable, both or neither): text prompt sets the refusal
direction is built from (the paper's protocol, e.g. advbench vs alpaca; names in
`mars_core.benchmarks.TEXT_SETS`), balanced and split 80/20 into direction and held-out
selection prompts; without them the model's built-in text suite is used.
Writes OUT/data/evaluate.nc and OUT/figures/evaluate.md; shards are cached in
OUT/.mars_cache/evaluate/, so an interrupted run resumes.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any, Callable

from mars_core.errors import InputError


def _pairs(items: list[str] | None, what: str, form: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for it in items or []:
        key, eq, val = it.partition("=")
        if not eq or not key.strip() or not val.strip():
            raise InputError(f"{what} {it!r}: expected {form}")
        if key.strip() in out:
            raise InputError(f"{what} {key.strip()!r} given twice")
        out[key.strip()] = val.strip()
    return out


def _options(items: list[str] | None) -> dict[str, dict[str, str]]:
    out: dict[str, dict[str, str]] = {}
    for key, val in _pairs(items, "--option", "NAME.KEY=VALUE").items():
        bench, dot, opt = key.partition(".")
        if not dot or not opt:
            raise InputError(f"--option {key}={val}: expected BENCHMARK.OPTION=VALUE (e.g. mm_safetybench.variant=SD)")
        out.setdefault(bench, {})[opt] = val
    return out


def _judge(spec: str) -> Any:
    if spec.startswith("guard:"):
        from mars_core.judges import GuardJudge

        return GuardJudge.from_pretrained(spec[len("guard:"):])
    return spec  # "substring" / "first_token"; anything else is rejected by as_verdict_judge


def run(args) -> int:
    from .reproduce import Settings

    from .evaluate import evaluate
    from mars_core.remote import remote_from_args

    from .cli import _quiet_libraries, check_writable

    mode = remote_from_args(args)  # checks the key and the model id before anything loads
    check_writable(args.out)
    _quiet_libraries()
    st = dataclasses.replace(Settings.quick() if args.quick else Settings(), seed=args.seed)
    benchmarks = _pairs(args.benchmark, "--benchmark", "NAME=PATH (e.g. figstep=data/FigStep)")
    if not benchmarks:
        raise InputError("give at least one --benchmark NAME=PATH")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    res = evaluate(
        args.model or "organism", methods, benchmarks, out=Path(args.out), judge=_judge(args.judge), limit=args.limit,
        options=_options(args.option), chunk_size=args.chunk_size, max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size, num_frames=args.num_frames, settings=st, fresh=args.fresh,
        progress=not args.no_progress, dtype=args.dtype, device_map=args.device_map, remote=mode,
        harmful_texts=_pairs(args.harmful, "--harmful", "NAME=PATH (e.g. advbench=data/harmful_behaviors.csv)"),
        harmless_texts=_pairs(args.harmless, "--harmless", "NAME=PATH (e.g. alpaca=data/alpaca_data.json)"),
    )
    print(res.table, flush=True)
    return 0


def register(sub: Any, model_args: Callable[[argparse.ArgumentParser], None]) -> argparse.ArgumentParser:
    """Add the `evaluate` subcommand to the `mars` parser's subparsers (`model_args` adds the shared
    --model/--remote/--dtype/--device-map/--seed options)."""
    from .evaluate import METHODS

    s = sub.add_parser("evaluate", help="steering methods x benchmarks on one model, judged (resumable)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    model_args(s)
    s.add_argument("--benchmark", "-b", action="append", metavar="NAME=PATH",
                   help="a registered benchmark and its local copy (repeatable)")
    s.add_argument("--option", action="append", metavar="NAME.KEY=VALUE", help="benchmark loader option (repeatable)")
    s.add_argument("--methods", default="none,actadd,mars",
                   help=f"comma-separated methods (default none,actadd,mars) from: {','.join(METHODS)}")
    s.add_argument("--harmful", action="append", metavar="NAME=PATH",
                   help="harmful text prompt set for the direction (repeatable; e.g. advbench=PATH)")
    s.add_argument("--harmless", action="append", metavar="NAME=PATH",
                   help="harmless text prompt set for the direction (repeatable; e.g. alpaca=PATH)")
    s.add_argument("--judge", default="substring", help="substring (default), first_token, or guard:PATH")
    s.add_argument("--limit", type=int, default=None, help="first N records per benchmark")
    s.add_argument("--chunk-size", type=int, default=16, help="records per resumable shard (default 16)")
    s.add_argument("--max-new-tokens", type=int, default=None, help="greedy tokens per response (default 8)")
    s.add_argument("--batch-size", type=int, default=None, help="prompts per generate call (default 32)")
    s.add_argument("--num-frames", type=int, default=None,
                   help="frames sampled per video (default 8; 4 for organism:video)")
    s.add_argument("--out", default=".", help="output directory (data/evaluate.nc, figures/evaluate.md)")
    s.add_argument("--fresh", action="store_true", help="recompute every shard and cached step")
    s.add_argument("--quick", action="store_true", help="small sizes for building the methods, for a fast check")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    s.set_defaults(func=run)
    return s
