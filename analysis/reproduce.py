"""`mars reproduce`: every analysis and figure of the MARS study, resumable.

    study = model_study("organism", Path("out"), settings=Settings())
    written = run(study)        # OUT/data/*.nc, OUT/data/mars/ (the fitted MARS), OUT/figures/*

The steps (`analysis.steps.STEPS`) run through `analysis.graph.run_steps`: each is keyed by the
content of everything it reads and cached under `OUT/.mars_cache/`, so a rerun after an
interruption (or after changing one input) recomputes exactly the steps that read something new;
`fresh=True` recomputes everything. Settings are immutable (`Settings` is frozen); the fitted
MARS is a value the later steps read, never written back.

Outputs: `OUT/data/*.nc` (datasets of docs/datasets.md), `OUT/data/directions.safetensors`,
`OUT/data/calibration.safetensors`, `OUT/data/mars/` (the fitted operator, `MARS.load`),
`OUT/figures/*.pdf|png` and the tables `OUT/figures/comparison*.md|json` (`write_figures`, the
same function `mars figures` runs).
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from mars_core.prompts import PromptSet

from .cache import StepCache
from .graph import Step, needed, run_steps
from .models import ModelRef, checkpoint_ref, is_smol, open_model, open_organism, organism_kind
from .steps import STEPS, variant_steps


@dataclass(frozen=True)
class Settings:
    """Sizes and choices of a run (immutable: derive a changed copy with `dataclasses.replace`).

    The MARS gate: `mars_tau` / `mars_gain` / `mars_margin` None = fitted on safe data
    (`mars_core.steering.fit_mars`, the most permissive gate adding <= `mars_max_increase`
    first-token refusal to each safe calibration set), a float = fixed to that value."""

    seed: int = 0
    strengths: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0, 4.0)
    curve_layers: tuple[int, ...] | None = None  # None: every layer
    max_new_tokens: int = 8
    batch_size: int = 32
    n_per_set: int | None = None  # cap on prompts per evaluation set (None: all)
    curve_n_per_set: int | None = 64  # cap for the layer x strength x method sweeps
    actadd_coeff: float = 1.0
    n_boot: int = 1000
    mars_tau: float | None = None
    mars_gain: float | None = None
    mars_margin: float | None = None
    mars_taus: tuple[float, ...] | None = None  # None: mars_core.steering.gate.DEFAULT_TAUS
    mars_gains: tuple[float, ...] = (2.0, 4.0, 8.0, 16.0)
    mars_margins: tuple[float, ...] = (0.0, 0.5)
    mars_max_increase: float = 0.05
    protocol_tokens: int = 16  # greedy tokens per reply of the held-out protocol (read whole by the strict judge)
    mars_layers: tuple[int, ...] | None = None  # MARS layer-selection candidates (None: every layer)
    selection_layers: tuple[int, ...] | None = None  # text_selection candidate layers (None: every layer)
    selection_positions: tuple[int, ...] | None = None  # text_selection candidate positions (None: every extracted)

    def __post_init__(self):
        for name in ("strengths", "curve_layers", "mars_taus", "mars_gains", "mars_margins", "mars_layers",
                     "selection_layers", "selection_positions"):
            v = getattr(self, name)
            if v is not None and not isinstance(v, tuple):
                object.__setattr__(self, name, tuple(v))

    @property
    def mars_gate(self) -> dict[str, float | None]:
        """The gate parts the settings fix (None: fitted)."""
        return {"tau": self.mars_tau, "gain": self.mars_gain, "margin": self.mars_margin}

    @property
    def mars_grids(self) -> dict[str, list[float]]:
        from mars_core.steering.gate import DEFAULT_TAUS

        return {"taus": list(self.mars_taus or DEFAULT_TAUS), "gains": list(self.mars_gains),
                "margins": list(self.mars_margins)}

    @classmethod
    def quick(cls, **changes: Any) -> "Settings":
        """Small sizes for smoke tests (`--quick`)."""
        return cls(**{"strengths": (0.5, 2.0), "max_new_tokens": 6, "n_per_set": 8, "curve_n_per_set": 8,
                      "n_boot": 200, **changes})


@dataclass
class Study:
    """What one run needs: the graph's sources, its steps, where it writes, and its cache."""

    sources: dict[str, Any]
    steps: list[Step]
    out: Path
    cache: StepCache
    log: Callable[[str], None] = print
    targets: list[str] | None = None
    meta: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------- sources
def _spread(total: int, n: int) -> list[int]:
    """n indices spread evenly over range(total) (so every concept keeps some prompts)."""
    import numpy as np

    return sorted({int(i) for i in np.linspace(0, total - 1, n).round()})


def cap(ps: PromptSet, n: int | None) -> PromptSet:
    """`ps` cut to `n` prompts spread over it (all of it for None)."""
    return ps if n is None or len(ps) <= n else ps.subset(_spread(len(ps), n))


def study_sources(mm: Any, suite: dict[str, PromptSet], settings: Settings, *,
                  checkpoints: dict[str, ModelRef] | None = None,
                  variants: dict[str, ModelRef] | None = None, strict_judge: Any = None,
                  protocol: tuple[str, ...] = ()) -> dict[str, Any]:
    """The graph's sources (`analysis.steps` module docstring) from a model, its prompt suite and
    the settings. Which suite set serves what is decided here, once."""
    st, s = settings, suite
    n, nc = st.n_per_set, st.curve_n_per_set
    media = {m: s[f"neutral_{m}"] for m in ("image", "video") if f"neutral_{m}" in s}
    mods = [m for m in ("image", "video") if f"harmful_{m}" in s]
    out: dict[str, Any] = {
        "mm": mm,
        "harmful_text_train": s["harmful_text_train"], "harmless_text_train": s["harmless_text_train"],
        "harmful_text_sel": cap(s["harmful_text"], n), "harmless_text_sel": cap(s["harmless_text"], n),
        "neutral_text": s["neutral_text"], "neutral_media": media,
        "gate_safe": {k: cap(s[k], n) for k in ("harmless_text_train", "harmless_image_cal", "captions_cal") if k in s},
        "align_harmful": {"image": s["harmful_image_cal"]} if "harmful_image_cal" in s else {},
        "align_harmless": {"image": s["harmless_image_cal"]} if "harmless_image_cal" in s else {},
        "curve_sets": {(m, side): cap(s[f"{side}_{m}"], nc) for m in ["text"] + mods for side in ("harmful", "harmless")},
        "spurious_safe": {m: cap(s[f"harmless_{m}"], nc) for m in mods},
        "stability_harmful": cap(s["harmful_image"], n) if "harmful_image" in s else None,
        "eval_sets": {**{f"{side}_{m}": cap(s[f"{side}_{m}"], n) for m in ["text"] + mods
                         for side in ("harmful", "harmless")},
                      **({"caption_accuracy": cap(s["captions"], n)} if "captions" in s else {})},
        "variant_eval_sets": {k: cap(s[k], n) for k in ("harmful_image", "harmless_image") if k in s},
        "checkpoints": dict(checkpoints or {}),
        "protocol_sets": {k: cap(s[k], n) for k in protocol if k in s}, "strict_judge": strict_judge,
        "protocol_tokens": st.protocol_tokens,
        "seed": st.seed, "batch_size": st.batch_size, "max_new_tokens": st.max_new_tokens,
        "strengths": st.strengths, "curve_layers": st.curve_layers, "actadd_coeff": st.actadd_coeff,
        "n_boot": st.n_boot, "mars_gate": st.mars_gate, "mars_grids": st.mars_grids,
        "mars_max_increase": st.mars_max_increase, "mars_layers": st.mars_layers,
        "selection_candidates": {"layers": st.selection_layers, "positions": st.selection_positions},
        # text prompts on the image sets' topics for shared_structure's random topic splits (the
        # SmolLM2 suite's image topics are held out of its direction's training topics)
        "structure_text": {side: s[f"{side}_text_heldout_topics"] for side in ("harmful", "harmless")
                           if f"{side}_text_heldout_topics" in s},
    }
    for name, ref in (variants or {}).items():
        out[f"variant_{name}"] = ref
    return out


def study_targets(sources: dict[str, Any], steps: list[Step]) -> list[str]:
    """Every step the sources support (stability needs two checkpoints; alignment image sets)."""
    skip = set()
    if len(sources.get("checkpoints") or {}) < 2:
        skip.add("stability")
    if not sources.get("align_harmful"):
        skip.add("alignment")
    if not sources["neutral_media"]:
        skip |= {"spurious_refusal"}
    if not sources.get("protocol_sets") or sources.get("strict_judge") is None:
        skip.add("heldout")
    if not {"harmful_image", "harmless_image"} <= set(sources["eval_sets"]):
        skip.add("shared_structure")
    return [s.name for s in steps if s.name not in skip]


# ---------------------------------------------------------------------------- studies
def default_suite(spec: Any, mm: Any, seed: int) -> dict[str, PromptSet]:
    """The prompt suite a `--model` spec gets: the toy organism's own (its vocabulary and glyph
    images; video sets for a video-capable variant) for organism specs, else the data-free
    typographic suite at the model's resolution (text sets only for a text-only model)."""
    from mars_core.organism.sets import organism_suite
    from mars_core.steering import media_side

    from .suite import typographic_suite

    kind = organism_kind(spec) if isinstance(spec, (str, type(None))) else None
    if is_smol(kind):
        from mars_core.organism.smol import build_sets

        return build_sets(seed)
    if kind is not None:
        return organism_suite(seed, video=mm.supports_video)
    suite = typographic_suite(seed, image_size=media_side(mm, default=224))
    return suite if mm.supports_image else {k: v for k, v in suite.items() if v.modality == "text"}


def organism_study(out: Path, *, fresh: bool = False, settings: Settings = Settings(), log=print,
                   kind: str = "") -> Study:
    """The built-in toy organism (or `organism:VARIANT` / `organism:RUN_DIR`), its prompt suite,
    its training checkpoints (stability) and, for the shipped natural weights, the `offset`
    variant (re-centering)."""
    from mars_core.organism import load_organism
    from mars_core.organism.load import WEIGHTS, weights_dir

    mm, run_dir = open_organism(kind)
    natural = (kind or "natural") == "natural"
    if run_dir is None and natural:
        paths = {name: WEIGHTS / "checkpoints" / name for name in ("stage1", "stage2")}
        paths["stage3"] = weights_dir("natural")
        paths["stage4_extra"] = WEIGHTS / "checkpoints" / "stage4_extra"
        base = "mars-organism/natural"
    elif run_dir is not None:
        paths = {name: run_dir / name for name in ("stage1", "stage2", "stage3", "stage4_extra")
                 if (run_dir / name / "model.safetensors").exists()}
        base = mm.model_id
    else:
        paths, base = {}, mm.model_id
    ckpts = {name: checkpoint_ref(name, p, f"{base}@{name}") for name, p in paths.items()}
    variants = {}
    if run_dir is None and natural:
        from mars_core.loading import load_model

        variants["offset"] = ModelRef("offset", lambda: load_model(*load_organism("offset"), family="llava",
                                                                   model_id="mars-organism/offset"),
                                      _shipped_fingerprint("offset"))
    from mars_core.organism.judge import ToyJudge
    from mars_core.organism.sets import HELDOUT_SETS

    protocol = HELDOUT_SETS + (("harmful_video", "harmless_video", "captions_video") if mm.supports_video else ())
    sources = study_sources(mm, default_suite("organism", mm, settings.seed), settings, checkpoints=ckpts,
                            variants=variants, strict_judge=ToyJudge(), protocol=protocol)
    steps = list(STEPS) + [s for v in variants for s in variant_steps(v)]
    return Study(sources, steps, Path(out), StepCache(Path(out) / ".mars_cache", fresh), log,
                 study_targets(sources, steps), {"model": mm.model_id, "suite": "toy organism"})


SMOL_PROTOCOL = ("harmful_text", "harmless_text", "harmful_text_heldout_topics", "harmless_text_heldout_topics",
                 "harmful_text_heldout_templates", "harmless_text_heldout_templates", "lookalike_text",
                 "harmful_image", "harmless_image", "lookalike_image", "objectless_image", "captions")
"""The SmolLM2 organism's held-out protocol sets (`mars_core.organism.smol.data.build_sets`), in table order."""
SMOL_DEFAULTS = {"curve_layers": (3, 9, 15, 21, 27), "curve_n_per_set": 16, "strengths": (0.5, 1.0, 2.0, 4.0),
                 "mars_layers": tuple(range(3, 28, 3)), "selection_layers": tuple(range(0, 30, 3)),
                 "selection_positions": (-1,), "n_per_set": 48, "batch_size": 48}
"""What the SmolLM2 study changes from `Settings()` where the settings leave it at the default
(fixed before any measurement, for CPU time: a 30-layer model makes every layer x strength
sweep 7x the toy's): sweeps and MARS layer selection on every third layer, the paper's
direction selection at the last position only, 48 prompts per evaluation set."""


def smol_settings(settings: Settings) -> Settings:
    """`settings` with `SMOL_DEFAULTS` for every field still at its `Settings()` default."""
    from dataclasses import replace

    default = Settings()
    return replace(settings, **{k: v for k, v in SMOL_DEFAULTS.items() if getattr(settings, k) == getattr(default, k)})


def smol_study(out: Path, *, fresh: bool = False, settings: Settings = Settings(), log=print,
               kind: str = "smol") -> Study:
    """The SmolLM2-135M-Instruct organism (`organism:smol`, or a run `organism:smol:RUN_DIR`,
    whose stage_b / stage_c are the stability checkpoints), its prompt suite, the held-out protocol
    with its strict judge."""
    from mars_core.organism.smol.judge import StrictJudge

    from .models import smol_ref

    mm, run_dir = open_organism(kind)
    ckpts = {}
    if run_dir is not None:
        ckpts = {name: smol_ref(name, run_dir / name, f"{mm.model_id}@{name}") for name in ("stage_b", "stage_c")
                 if (run_dir / name / "organism.safetensors").is_file()}
    settings = smol_settings(settings)
    sources = study_sources(mm, default_suite(f"organism:{kind}", mm, settings.seed), settings, checkpoints=ckpts,
                            strict_judge=StrictJudge(), protocol=SMOL_PROTOCOL)
    steps = list(STEPS)
    return Study(sources, steps, Path(out), StepCache(Path(out) / ".mars_cache", fresh), log,
                 study_targets(sources, steps), {"model": mm.model_id, "suite": "SmolLM2 organism"})


def _shipped_fingerprint(variant: str) -> str:
    from mars_core.organism.load import weights_dir

    from .models import folder_fingerprint

    return folder_fingerprint(weights_dir(variant))


def hub_study(model: Any, out: Path, *, fresh: bool = False, settings: Settings = Settings(), log=print,
              remote: Any = False, dtype: str | None = None, device_map: str | None = None) -> Study:
    """A hub model (or local directory, tiny:FAMILY, or a MarsModel in memory) with the data-free
    typographic suite."""
    mm = open_model(model, dtype=dtype, device_map=device_map, remote=remote, seed=settings.seed)
    sources = study_sources(mm, default_suite(model, mm, settings.seed), settings)
    return Study(sources, list(STEPS), Path(out), StepCache(Path(out) / ".mars_cache", fresh), log,
                 study_targets(sources, list(STEPS)), {"model": mm.model_id, "suite": "typographic"})


def model_study(model: Any, out: Path, *, fresh: bool = False, settings: Settings = Settings(), log=print,
                remote: Any = False, dtype: str | None = None, device_map: str | None = None) -> Study:
    """The study for any `--model` spec (`analysis.models`): the organism's own suite for
    organism specs, the typographic suite otherwise."""
    from mars_core.errors import InputError

    kind = organism_kind(model) if isinstance(model, (str, type(None))) else None
    if kind is not None:
        if remote:
            raise InputError("the organism pipeline runs locally (it also loads training checkpoints and variants "
                             "that NDIF does not host); give a hub model id (--model org/name) with --remote "
                             "(mars extract / mars steer take --remote local on the organism)")
        if is_smol(kind):
            return smol_study(out, fresh=fresh, settings=settings, log=log, kind=kind)
        return organism_study(out, fresh=fresh, settings=settings, log=log, kind=kind)
    return hub_study(model, out, fresh=fresh, settings=settings, log=log, remote=remote, dtype=dtype,
                     device_map=device_map)


# ---------------------------------------------------------------------------- the run
DATA_FILES = {  # step -> how its value lands in OUT/data
    "directions": "directions.safetensors", "calibration": "calibration.safetensors", "mars": "mars",
    "text_selection": "text_selection.nc", "alignment": "alignment.nc", "refusal_curves": "refusal_curves.nc",
    "spurious_refusal": "spurious_refusal.nc", "stability": "stability.nc", "comparison": "comparison.nc",
    "heldout": "heldout.nc", "shared_structure": "shared_structure.nc",
}


def run(study: Study, *, figures: bool = True, progress: bool = True) -> dict[str, Path]:
    """Run every step of `study`, write its data (and, with `figures`, the figures and tables);
    returns {artifact name: path}. One progress bar over the steps (`progress=False`: none)."""
    from tqdm.auto import tqdm

    from mars_core.datasets import save_dataset

    out, log = study.out, study.log
    data = out / "data"
    data.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    todo = needed(study.steps, study.targets)
    bar = tqdm(total=len(todo), desc="mars study", unit="step", disable=not progress)

    def on_step(step, how):
        bar.set_postfix_str(f"{step.name} {how}", refresh=False)
        bar.update(1)

    try:
        values = run_steps(study.steps, study.sources, study.cache, targets=study.targets, on_step=on_step)
    finally:
        bar.close()
    written: dict[str, Path] = {}
    for name, fname in DATA_FILES.items():
        if name in values:
            if fname.endswith(".nc"):
                written[name] = save_dataset(values[name], data / fname)
            else:
                if (data / fname).is_dir():
                    shutil.rmtree(data / fname)  # no stale file of an earlier fit stays in the folder
                written[name] = values[name].save(data / fname)
    mars = values.get("mars")
    if mars is not None:
        written["mars_layer_selection"] = save_dataset(mars.selection, data / "mars_layer_selection.nc")
        if mars.gate_selection is not None:
            written["mars_gate"] = save_dataset(mars.gate_selection, data / "mars_gate.nc")
        fi = mars.fit_info
        log(f"MARS: layer {mars.layer}, gate {mars.gate}"
            + (f" (layer selection fell back: {fi['layer_fallback']})" if fi.get("layer_fallback") else "")
            + (" (gate fit fell back: no grid point met the safe-set bound)" if fi.get("gate_fallback") else ""))
    for step in study.steps:
        if step.name.startswith("variant_") and step.name in values:
            for name, ds in values[step.name].items():
                written[name] = save_dataset(ds, data / f"{name}.nc")
    if figures:
        written.update(write_figures(out, log=lambda m: None))
    reused = sum(1 for e in study.cache.events if e[1] == "reused")
    log(f"done in {time.perf_counter() - t0:.0f} s: {len(written)} artifacts under {out}, "
        f"{reused} of {len(study.cache.events)} steps reused from the cache")
    return written


def write_figures(out: Path, log=print) -> dict[str, Path]:
    """Every figure and table of the datasets in `OUT/data` (written by `run` or `mars analyze`),
    into `OUT/figures`; `mars figures` and `mars reproduce` both call this. Returns {name: path}."""
    from mars_core.datasets import load_dataset
    from mars_core.errors import InputError

    from .figure_set import write_all

    data = Path(out) / "data"
    files = sorted(data.glob("*.nc"))
    if not files:
        raise InputError(f"no datasets in {data}; run `mars analyze --out {out}` first")
    written = write_all({f.stem: load_dataset(f) for f in files}, Path(out) / "figures")
    for p in written.values():
        log(f"wrote {p}")
    return written
