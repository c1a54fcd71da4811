"""`mars evaluate`: steering methods x benchmarks on one model, judged, resumable per shard.

    res = evaluate("organism", ["none", "mars"], {"figstep": "data/FigStep", "mm_vet": "data/mm-vet"},
                   out="runs/eval", limit=50)
    res.dataset      # xarray Dataset (analysis.evaluate_data), also OUT/data/evaluate.nc
    res.table        # the paper-style Markdown table, also OUT/figures/evaluate.md

1. Benchmarks are `{name: path}` loaded with `mars_core.benchmarks.registry.load_benchmark`
   (or `{name: [Record, ...]}` given directly). Checked before any model work: a known name, an
   existing path, loader options, a method name from `METHODS`, the judge; once the model is
   loaded and before any shard, that it takes every record's modality (a video benchmark on an
   image-only model is an error naming both).
2. Methods are built by the study's own steps (`analysis.steps`, the graph `mars reproduce`
   runs): text refusal directions from the model's text prompt sets (the organism's, the
   typographic suite for other models, or the given `--harmful/--harmless` sets), MARS
   calibration (neutral images; neutral videos too when a benchmark has video), the fitted MARS
   (`fit_mars`), AutoSteer fitted on the text pairs. Those steps are cached in `OUT/.mars_cache/`
   keyed by the content of what they read, so changing the direction sets refits everything
   that depends on them.
3. Work is split into shards: one method x one benchmark x one chunk of `chunk_size` records of
   one modality. Each shard (responses, verdicts, first-token scores, reference matches) is
   written atomically as JSON under `OUT/.mars_cache/evaluate/`, keyed by everything that
   determines it (the model's fingerprint, the steerer's content fingerprint, the chunk's texts
   and media pixels, judge, decoding length). A rerun after an interruption loads finished shards and computes
   only the missing ones; `fresh=True` recomputes all.
4. The verdicts go into one labelled Dataset and a Markdown table (`analysis.evaluate_data`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from mars_core.errors import InputError
from .evaluate_data import reference_match

from .steps import METHODS

__all__ = ["METHODS", "EvalResult", "evaluate", "load_benchmarks", "reference_match", "Shard", "with_direction_sets"]


@dataclass
class EvalResult:
    """What `evaluate` returns: the Dataset, the Markdown table, written paths and the shard
    cache events [(shard name, "computed" | "reused", path)]."""

    dataset: Any
    table: str
    paths: dict[str, Path]
    events: list = field(default_factory=list)


@dataclass(frozen=True)
class Shard:
    """One unit of work: `method` on records `index` (positions in the benchmark) of `benchmark`."""

    method: str
    benchmark: str
    modality: str
    chunk: int
    index: tuple[int, ...]

    @property
    def name(self) -> str:
        return f"evaluate-{self.method}-{self.benchmark}-{self.modality}{self.chunk:04d}"


# ------------------------------------------------------------------------------ inputs
def _text_records(sets: Mapping[str, Any], side: str) -> list:
    """Records of {name: path (a `TEXT_SETS` loader) or [Record]}, concatenated."""
    from mars_core.benchmarks.records import Record
    from mars_core.benchmarks.text_sets import load_text_set

    out: list = []
    for name, src in sets.items():
        recs = load_text_set(name, src) if isinstance(src, (str, Path)) else list(src)
        if not recs or not all(isinstance(r, Record) and r.modality == "text" for r in recs):
            raise InputError(f"{side} direction set {name!r}: give a path or a non-empty list of text Records")
        out += recs
    return out


def with_direction_sets(suite: dict, harmful: Sequence[Any], harmless: Sequence[Any], *, seed: int = 0,
                        heldout: float = 0.2) -> dict:
    """`suite` with its text sets replaced by a balanced pair of the given text records (the
    paper's protocol: e.g. AdvBench vs Alpaca): `harmful/harmless_text_train` (the difference of
    means) and a disjoint held-out `harmful/harmless_text` (`heldout` of each side; layer and
    direction selection), split with `default_rng(seed)`. Other sets are kept."""
    from mars_core.benchmarks.text_splits import balanced_pair

    hp, lp = balanced_pair(harmful, harmless, seed=seed, names=("harmful_text", "harmless_text"))
    n = len(hp)
    n_ho = int(round(n * heldout))
    if n < 2 or not 1 <= n_ho < n:
        raise InputError(f"a balanced pair of {n} prompts per side cannot be split into direction and held-out "
                         f"sets (heldout={heldout}); give more prompts per side")
    perm = np.random.default_rng([seed, 7]).permutation(n)
    ho, tr = sorted(perm[:n_ho].tolist()), sorted(perm[n_ho:].tolist())
    out = dict(suite)
    out.update({"harmful_text_train": hp.subset(tr, "harmful_text_train"),
                "harmless_text_train": lp.subset(tr, "harmless_text_train"),
                "harmful_text": hp.subset(ho, "harmful_text"), "harmless_text": lp.subset(ho, "harmless_text")})
    return out


def load_benchmarks(benchmarks: Mapping[str, Any], *, limit: int | None = None,
                    options: Mapping[str, dict] | None = None) -> dict[str, list]:
    """{name: [Record]} from {name: path} (registry loader) or {name: [Record]} (first `limit`)."""
    from mars_core.benchmarks.records import Record

    if not benchmarks:
        raise InputError("no benchmarks given; pass name=PATH pairs (e.g. figstep=data/FigStep)")
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise InputError(f"limit={limit!r}; give a positive integer or None")
    out: dict[str, list] = {}
    for name, src in benchmarks.items():
        if isinstance(src, (str, Path)):
            from mars_core.benchmarks.registry import BENCHMARKS, load_benchmark

            if name not in BENCHMARKS:
                raise InputError(f"unknown benchmark {name!r}; known: {', '.join(sorted(BENCHMARKS))}")
            if not Path(src).exists():
                raise InputError(f"benchmark {name!r}: path {str(src)!r} does not exist; give the folder of its "
                                 f"local copy ({BENCHMARKS[name].layout})")
            recs = load_benchmark(name, src, limit=limit, **dict((options or {}).get(name, {})))
        else:
            recs = list(src)
            if not recs or not all(isinstance(r, Record) for r in recs):
                raise InputError(f"benchmark {name!r}: give a path or a non-empty list of Record")
            recs = recs[:limit] if limit is not None else recs
        ids = [r.id for r in recs]
        if len(set(ids)) != len(ids):
            raise InputError(f"benchmark {name!r}: record ids are not unique")
        out[name] = recs
    return out


def _kinds(recs: Mapping[str, list]) -> dict[str, str]:
    """Benchmark kind: the registry's when the name is registered, else from the records."""
    from mars_core.benchmarks.registry import BENCHMARKS

    out = {}
    for name, rs in recs.items():
        if name in BENCHMARKS:
            out[name] = BENCHMARKS[name].kind
        elif any(r.harmful is not None for r in rs):
            out[name] = "video_safety" if all(r.modality == "video" for r in rs) else "safety"
        else:
            out[name] = "utility"
    return out


def _check_methods(methods: Sequence[str]) -> list[str]:
    methods = [methods] if isinstance(methods, str) else list(methods)
    if not methods:
        raise InputError(f"no methods given; choose from {', '.join(METHODS)}")
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise InputError(f"unknown method(s) {bad}; choose from {', '.join(METHODS)}")
    if len(set(methods)) != len(methods):
        raise InputError(f"repeated methods in {methods}")
    return methods


def _check_modalities(mm: Any, recs: Mapping[str, list]) -> None:
    for name, rs in recs.items():
        for mod in sorted({r.modality for r in rs}):
            takes = {"text": True, "image": mm.supports_image, "video": mm.supports_video}[mod]
            if not takes:
                hint = " (or the video-capable organism: --model organism:video)" if mod == "video" else ""
                raise InputError(
                    f"benchmark {name!r} has {mod} records but the model {mm.model_id!r} (family "
                    f"{mm.family.name}) cannot take {mod}s; evaluate it on a {mod}-capable model: --model "
                    f"with a hub id of a {mod} family (see the README's family table){hint}")


# ------------------------------------------------------------------------------ methods
class _Methods:
    """The requested steerers, built from the study's steps (`analysis.steps`, the same graph and
    cache as `mars reproduce`): directions, calibration (with a video offset when a benchmark has
    video), the fitted MARS and, when asked for, AutoSteer."""

    def __init__(self, study: Any, methods: Sequence[str]):
        self.study, self.methods = study, list(methods)

    @functools.cached_property
    def steerers(self) -> dict[str, Any]:
        from .graph import run_steps
        from .steps import STEPS, comparison_steerers

        st = self.study
        targets = ["directions", "calibration", "mars"] + (["autosteer"] if "autosteer" in self.methods else [])
        st.log("building methods: directions, MARS calibration, layer and gate (cached steps)")
        v = run_steps(STEPS, st.sources, st.cache, targets=targets)
        every = comparison_steerers(v["mm"], v["directions"], v["calibration"], v["mars"], v.get("autosteer"),
                                    v["actadd_coeff"])
        self.layer = int(v["mars"].layer)
        return {m: every[m] for m in self.methods}


def _with_video_neutral(study: Any, requests: Sequence[str] | None) -> None:
    """Give the study's calibration a video offset: the suite's neutral video set, or 8 generated
    object-less videos (blank / noise, 4 frames) with their own text baseline (same requests)."""
    from mars_core.steering.neutral import neutral_sets

    src = study.sources
    if "video" in src["neutral_media"]:
        return
    text, media = neutral_sets(src["mm"], ["video"], 8, seed=src["seed"], requests=requests)
    base = src["neutral_text"]
    src["neutral_text"] = {**({m: base for m in src["neutral_media"]} if not isinstance(base, dict) else base),
                           "video": text}
    src["neutral_media"] = {**src["neutral_media"], "video": media["video"]}


# ------------------------------------------------------------------------------ shards
def _shards(methods: Sequence[str], recs: Mapping[str, list], chunk_size: int) -> list[Shard]:
    out = []
    for bench, rs in recs.items():
        by_mod: dict[str, list[int]] = {}
        for i, r in enumerate(rs):
            by_mod.setdefault(r.modality, []).append(i)
        for method in methods:
            for mod, idx in by_mod.items():
                for c, s in enumerate(range(0, len(idx), chunk_size)):
                    out.append(Shard(method, bench, mod, c, tuple(idx[s:s + chunk_size])))
    return out


def _promptset(records: list, name: str, num_frames: int):
    from mars_core.benchmarks.media import load_image, load_video
    from mars_core.benchmarks.records import records_to_promptset

    return records_to_promptset(records, name, load_image=load_image,
                                load_video=functools.partial(load_video, num_frames=num_frames))


def _compute_shard(mm: Any, steerer: Any, judge: Any, ps: Any, records: list, *, max_new_tokens: int,
                   batch_size: int, utility: bool, layer: int | None = None) -> dict[str, Any]:
    """Responses, verdicts, first-token scores (if the judge needs them) and, on utility
    benchmarks, reference matches (NaN elsewhere: a safety benchmark's reference is the
    desired refusal, not a utility answer) of one shard."""
    media = ps.media_kwargs()
    responses = list(steerer.generate(mm, ps.texts, max_new_tokens=max_new_tokens, batch_size=batch_size, **media))
    scores = None
    if judge.needs_scores:
        scores = []
        for texts, med in ps.batches(batch_size):
            scores.extend(float(s) for s in judge.score_batch(mm, steerer, texts, med))
    verdicts = judge.verdicts(ps.texts, responses, scores=scores)
    if len(verdicts) != len(responses):
        raise InputError(f"judge {judge.name!r} returned {len(verdicts)} verdicts for {len(responses)} responses")
    matches = [reference_match(t, r.reference) if utility else float("nan") for t, r in zip(responses, records)]
    return {"ids": [r.id for r in records], "steerer": repr(steerer), "layer": layer, "responses": responses,
            "verdicts": [v.to_dict() for v in verdicts], "scores": scores, "reference_match": matches}


def _load_shard(path: Path, ids: list[str]) -> dict[str, Any]:
    data = json.loads(path.read_text(encoding="utf-8"))
    n = len(ids)
    if data.get("ids") != ids or any(len(data[k]) != n for k in ("responses", "verdicts", "reference_match")):
        raise ValueError(f"{path.name} does not hold the shard's {n} records")
    return data


# ------------------------------------------------------------------------------ driver
def evaluate(
    model: Any = "organism",
    methods: Sequence[str] = ("none", "mars"),
    benchmarks: Mapping[str, Any] | None = None,
    *,
    out: str | Path = ".",
    judge: Any = None,
    limit: int | None = None,
    options: Mapping[str, dict] | None = None,
    chunk_size: int = 16,
    max_new_tokens: int | None = None,
    batch_size: int | None = None,
    num_frames: int | None = None,
    settings: Any = None,
    fresh: bool = False,
    progress: bool = True,
    dtype: str | None = None,
    device_map: str | None = None,
    remote: bool | str = False,
    log: Callable[[str], None] | None = None,
    harmful_texts: Mapping[str, Any] | None = None,
    harmless_texts: Mapping[str, Any] | None = None,
) -> EvalResult:
    """Evaluate `methods` on `benchmarks` with `model` (module docstring).

    harmful_texts / harmless_texts: {text set name: local path (`TEXT_SETS`, e.g. advbench /
    alpaca) or [Record]}: build the refusal direction (and select layer and direction) from these
    instead of the model's built-in text suite (`with_direction_sets`); both or neither.

    model: "organism" (default), "organism:video" (the video-capable organism), a hub id / local
    directory, or a `MarsModel`. methods: names
    of `METHODS`. benchmarks: {registry name: local path} or {name: [Record]}; `limit`: first
    records per benchmark; `options`: {name: loader options}. judge: "substring" (default),
    "first_token", a `mars_core.judges.GuardJudge` or any judge `as_verdict_judge` accepts.
    chunk_size: records per shard. max_new_tokens / batch_size: default from `settings`
    (`analysis.reproduce.Settings`; its seed, MARS gate and ActAdd strength build the methods).
    num_frames: frames sampled per video (default 8; 4 for "organism:video", whose 128-position
    context fits at most 6). Writes OUT/data/evaluate.nc and OUT/figures/evaluate.md.
    """
    from tqdm.auto import tqdm

    from mars_core.datasets import save_dataset
    from mars_core.judges import as_verdict_judge
    from mars_core.provenance import atomic_write_json, atomic_write_text

    from .cache import StepCache
    from .evaluate_data import build_dataset, table_markdown
    from .models import organism_kind
    from .reproduce import Settings, model_study

    log = log or (lambda m: print(m, flush=True))
    methods = _check_methods(methods)
    judge = as_verdict_judge(judge)
    organism = organism_kind(model) is not None if isinstance(model, (str, type(None))) else False
    if num_frames is None:
        num_frames = 4 if organism and str(model).endswith(":video") else 8
    if int(chunk_size) < 1 or int(num_frames) < 1:
        raise InputError("chunk_size and num_frames must be >= 1")
    recs = load_benchmarks(benchmarks or {}, limit=limit, options=options)
    settings = settings if settings is not None else Settings()
    k = int(max_new_tokens or settings.max_new_tokens)
    bs = int(batch_size or settings.batch_size)
    out = Path(out)
    if bool(harmful_texts) != bool(harmless_texts):
        raise InputError("give both harmful_texts and harmless_texts (e.g. advbench and alpaca), or neither")
    harmful = _text_records(harmful_texts, "harmful") if harmful_texts else None
    harmless = _text_records(harmless_texts, "harmless") if harmless_texts else None
    study = model_study(model if model is not None else "organism", out, fresh=fresh, settings=settings, log=log,
                        remote=remote, dtype=dtype, device_map=device_map)
    mm = study.sources["mm"]
    if harmful is not None:  # the paper's protocol: the direction (and its selection) from these sets
        sets = with_direction_sets({}, harmful, harmless, seed=settings.seed)
        study.sources.update(harmful_text_train=sets["harmful_text_train"],
                             harmless_text_train=sets["harmless_text_train"],
                             harmful_text_sel=sets["harmful_text"], harmless_text_sel=sets["harmless_text"])
    _check_modalities(mm, recs)
    if any(r.modality == "video" for rs in recs.values() for r in rs):
        # the organism reads only its own vocabulary: its neutral requests calibrate video too
        _with_video_neutral(study, study.sources["neutral_text"].texts[:8] if organism else None)
    built = _Methods(study, methods)
    cache = StepCache(out / ".mars_cache" / "evaluate", fresh=fresh)
    st = settings
    # a shard is keyed by the steerer it runs (its content fingerprint: direction, calibration,
    # layer, gate), the model and the records; the steerers come from the cached study steps
    steerers = built.steerers
    method_key = {"model": mm.fingerprint, "batch": bs}

    kinds = _kinds(recs)
    shards = _shards(methods, recs, int(chunk_size))
    results: dict[Shard, dict] = {}
    t0 = time.perf_counter()
    bar = tqdm(shards, desc="evaluate", unit="shard", disable=not progress)
    for sh in bar:
        bar.set_postfix_str(f"{sh.method} / {sh.benchmark}", refresh=False)
        rows = [recs[sh.benchmark][i] for i in sh.index]
        ps = _promptset(rows, sh.benchmark, int(num_frames))
        ids = [r.id for r in rows]
        utility = kinds[sh.benchmark] == "utility"
        inputs = {**method_key, "method": sh.method, "steerer": steerers[sh.method].fingerprint,
                  "benchmark": sh.benchmark, "chunk": ps.sha256, "ids": ids,
                  "references": [r.reference for r in rows] if utility else None, "judge": judge.name, "tokens": k,
                  "frames": num_frames}
        results[sh] = cache.get(
            sh.name, inputs,
            lambda: _compute_shard(mm, steerers[sh.method], judge, ps, rows, max_new_tokens=k,
                                   batch_size=bs, utility=utility, layer=built.layer),
            lambda v, p: atomic_write_json(p, v), lambda p: _load_shard(p, ids), "json")
    bar.close()
    reused = sum(1 for e in cache.events if e[1] == "reused")
    log(f"evaluate: {len(shards)} shards ({reused} reused) in {time.perf_counter() - t0:.1f} s")

    ds = build_dataset(results, recs, methods, kinds=kinds, judge=judge, mm=mm, extra_attrs={
        "seed": st.seed, "max_new_tokens": k, "chunk_size": int(chunk_size), "limit": limit, "num_frames": num_frames,
        "mars_layer": next((d["layer"] for d in results.values() if d.get("layer") is not None), ""),
        "steerers": {sh.method: d.get("steerer", "") for sh, d in results.items()},
        "settings": dataclasses.asdict(st), "steerer_fingerprints": {m: steerers[m].fingerprint for m in methods},
        "benchmark_sources": {n: str(s) if isinstance(s, (str, Path)) else "records" for n, s in benchmarks.items()},
    })
    table = table_markdown(ds)
    paths = {"dataset": save_dataset(ds, out / "data" / "evaluate.nc"),
             "table": atomic_write_text(out / "figures" / "evaluate.md", table)}
    for p in paths.values():
        log(f"wrote {p}")
    return EvalResult(ds, table, paths, list(cache.events))
