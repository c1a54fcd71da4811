"""`mars reproduce`: every analysis and figure of the MARS study, resumable.

Steps (each cached under `OUT/.mars_cache/` by a key of its inputs, so a rerun after an
interruption reuses finished steps; `fresh=True` recomputes everything):

 1. text refusal directions (difference of means, every layer and post-instruction position);
 2. text direction selection (bypass / induce / KL per layer and position);
 3. MARS calibration (neutral modality offsets) and MARS layer selection;
 4. AutoSteer fit (SAS layer, prober, refusal head);
 5. analyses: alignment, refusal curves, spurious refusal, direction stability across
    checkpoints, method comparison (with bootstrap CIs), and re-centering on model variants
    whose modality offset points along the direction (the organism's `offset` variant);
 6. figures (PDF + PNG) and the comparison table (Markdown + JSON).

Outputs: `OUT/data/*.nc` (+ directions and calibration as safetensors), `OUT/figures/*.pdf|png`
and the comparison table `OUT/figures/comparison.md` / `comparison.json`.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from mars_core.provenance import atomic_write_json, atomic_write_text

from .cache import StepCache
from mars_core.datasets import load_dataset, save_dataset


@dataclass
class Settings:
    """Sizes of the run. `quick` shrinks everything for smoke tests."""

    seed: int = 0
    strengths: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0, 4.0)
    curve_layers: tuple[int, ...] | None = None  # None: every layer
    max_new_tokens: int = 8
    batch_size: int = 32
    n_per_set: int | None = None  # cap on prompts per evaluation set (None: all)
    curve_n_per_set: int | None = 64  # cap for the layer x strength x method sweeps
    actadd_coeff: float = 1.0
    n_boot: int = 1000
    # MARS gate: threshold tau (units of the text centroid gap), gain and trust-region margin.
    # None: fitted on safe data (`mars_core.steering.gate.select_mars_gate`: the most permissive gate,
    # smallest tau, then largest gain, then largest margin, on the grids below, adding
    # <= `mars_max_increase` first-token refusals to harmless text, harmless image requests and
    # caption prompts of the calibration split). The layer is chosen with the `*_init` gate, the
    # gate is then fitted at that layer, and the layer re-checked once with the fitted gate
    # (`step_mars_layer_and_gate`). A float fixes that part (its grid is that value); all three
    # fixed: no fitting.
    mars_tau: float | None = None
    mars_gain: float | None = None
    mars_margin: float | None = None
    mars_tau_init: float = 0.0
    mars_gain_init: float = 2.0
    mars_margin_init: float = 0.5
    mars_gains: tuple[float, ...] = (2.0, 4.0, 8.0, 16.0)
    mars_margins: tuple[float, ...] = (0.0, 0.5)
    mars_max_increase: float = 0.05

    @property
    def mars_gate_fixed(self) -> bool:
        return None not in (self.mars_tau, self.mars_gain, self.mars_margin)

    @property
    def mars_kwargs(self) -> dict:
        pick = lambda v, init: float(v if v is not None else init)  # noqa: E731
        return {"tau": pick(self.mars_tau, self.mars_tau_init), "gain": pick(self.mars_gain, self.mars_gain_init),
                "margin": pick(self.mars_margin, self.mars_margin_init)}

    @classmethod
    def quick(cls) -> "Settings":
        return cls(strengths=(0.5, 2.0), max_new_tokens=6, n_per_set=8, curve_n_per_set=8, n_boot=200)


@dataclass
class Context:
    """What the steps share."""

    mm: Any
    model_key: str
    suite: dict
    checkpoints: dict[str, Callable[[], Any]]  # name -> loader returning a MarsModel
    settings: Settings
    cache: StepCache
    out: Path
    log: Callable[[str], None]
    variants: dict[str, Callable[[], Any]] = field(default_factory=dict)  # name -> MarsModel loader


def _set_hashes(ctx: Context, *names: str) -> dict[str, str]:
    return {n: ctx.suite[n].sha256 for n in names if n in ctx.suite}


def _cap(ctx: Context, name: str, n: int | None = -1):
    """The suite's set `name`, cut to `n` prompts spread over it (default: settings.n_per_set)."""
    ps = ctx.suite[name]
    n = ctx.settings.n_per_set if n == -1 else n
    return ps if n is None or len(ps) <= n else ps.subset(_spread(len(ps), n))


def _spread(total: int, n: int) -> list[int]:
    """n indices spread evenly over range(total) (so every concept keeps some prompts)."""
    import numpy as np

    return sorted({int(i) for i in np.linspace(0, total - 1, n).round()})


# -- steps --------------------------------------------------------------------------------
def step_directions(ctx: Context):
    from mars_core.directions import RefusalDirections

    s = ctx.suite
    return ctx.cache.get(
        "directions",
        {"model": ctx.model_key, **_set_hashes(ctx, "harmful_text_train", "harmless_text_train")},
        lambda: RefusalDirections.extract(
            ctx.mm, s["harmful_text_train"].texts, s["harmless_text_train"].texts,
            batch_size=ctx.settings.batch_size, seed=ctx.settings.seed,
            dataset_names=("harmful_text_train", "harmless_text_train"),
        ),
        lambda v, p: v.save(p),
        lambda p: RefusalDirections.load(p, model=ctx.mm),
        "safetensors",
    )


def step_text_selection(ctx: Context, dirs):
    from mars_core.scoring import refusal_token_ids
    from mars_core.selection import select_direction

    harm, safe = _cap(ctx, "harmful_text"), _cap(ctx, "harmless_text")
    return ctx.cache.get(
        "text_selection",
        {"model": ctx.model_key, "harm": harm.sha256, "safe": safe.sha256},
        lambda: select_direction(
            ctx.mm, dirs, harm.texts, safe.texts, layers=None, positions=None,
            refusal_ids=refusal_token_ids(ctx.mm.tokenizer), batch_size=ctx.settings.batch_size,
        ),
        save_dataset, load_dataset, "nc",
    )


def step_calibration(ctx: Context, dirs):
    """`mars_core.steering.neutral_calibration` on the suite's neutral sets, cached."""
    from mars_core.steering import MarsCalibration, neutral_calibration

    neu_i, neu_t = ctx.suite["neutral_image"], ctx.suite["neutral_text"]
    return ctx.cache.get(
        "calibration",
        {"model": ctx.model_key, "neutral_image": neu_i.sha256, "neutral_text": neu_t.sha256},
        lambda: neutral_calibration(ctx.mm, dirs, neu_t, {"image": neu_i}, batch_size=ctx.settings.batch_size),
        lambda v, p: v.save(p),
        lambda p: MarsCalibration.load(p, model=ctx.mm),
        "safetensors",
    )


def step_mars_layer(ctx: Context, calib) -> tuple[int, Any]:
    """MARS's intervention layer from harmful text and neutral images (`select_mars_layer`)."""
    from mars_core.steering import select_mars_layer

    harm = _cap(ctx, "harmful_text")
    neu = ctx.suite["neutral_image"]
    ds = ctx.cache.get(
        "mars_layer_selection",
        {"model": ctx.model_key, "harm": harm.sha256, "neutral": neu.sha256, "mars": ctx.settings.mars_kwargs},
        lambda: select_mars_layer(
            ctx.mm, calib, harm.texts,
            neutral={"image": neu},
            batch_size=ctx.settings.batch_size, mars_kwargs=ctx.settings.mars_kwargs,
        )[1],
        save_dataset, load_dataset, "nc",
    )
    return int(ds.attrs["selected_layer"]), ds


def _gate_fixed_parts(st: Settings) -> dict:
    """{"tau"/"gain"/"margin": the value the settings fix, or None where the gate fits it}."""
    return {"tau": st.mars_tau, "gain": st.mars_gain, "margin": st.mars_margin}


def step_mars_gate(ctx: Context, calib, layer: int, fixed: dict | None = None):
    """MARS's gate (tau, gain, margin) at `layer`, fitted on the suite's safe calibration sets
    only (`mars_core.steering.gate.select_mars_gate`); a part `fixed` gives (default: the settings' fixed
    parts, `_gate_fixed_parts`) keeps its value."""
    from mars_core.steering.gate import DEFAULT_TAUS, select_mars_gate

    names = [n for n in ("harmless_text_train", "harmless_image_cal", "captions_cal") if n in ctx.suite]
    safe = {n: _cap(ctx, n) for n in names}
    st = ctx.settings
    fixed = _gate_fixed_parts(st) if fixed is None else fixed
    grids = {"taus": list(DEFAULT_TAUS) if fixed["tau"] is None else [fixed["tau"]],
             "gains": list(st.mars_gains) if fixed["gain"] is None else [fixed["gain"]],
             "margins": list(st.mars_margins) if fixed["margin"] is None else [fixed["margin"]]}
    ds = ctx.cache.get(
        "mars_gate",
        {"model": ctx.model_key, "layer": int(layer), "sets": {n: p.sha256 for n, p in safe.items()},
         "max_increase": st.mars_max_increase, "grids": grids},
        lambda: select_mars_gate(ctx.mm, calib, layer, safe, max_increase=st.mars_max_increase,
                                 batch_size=st.batch_size, **grids)[1],
        save_dataset, load_dataset, "nc",
    )
    return {k: float(ds.attrs[f"selected_{k}"]) for k in ("tau", "gain", "margin")}, ds


def _set_gate(st: Settings, gate: dict) -> None:
    st.mars_tau, st.mars_gain, st.mars_margin = gate["tau"], gate["gain"], gate["margin"]


def step_mars_layer_and_gate(ctx: Context, calib):
    """MARS's layer and gate: unless the settings fix the whole gate, choose the layer with the
    initial gate (`mars_*_init`), fit the gate there on safe data, re-choose the layer with the
    fitted gate and, if it moved, re-fit the gate at the new layer (one alternation; both
    Datasets say what was done). Sets `ctx.settings.mars_tau/gain/margin`. Returns (layer, layer
    Dataset, gate Dataset or None)."""
    st = ctx.settings
    if st.mars_gate_fixed:
        layer, ds = step_mars_layer(ctx, calib)
        return layer, ds, None
    fixed = _gate_fixed_parts(st)  # what the caller fixed, before the fitted values fill the settings
    layer0, _ = step_mars_layer(ctx, calib)
    gate, gate_ds = step_mars_gate(ctx, calib, layer0, fixed)
    _set_gate(st, gate)
    layer, ds = step_mars_layer(ctx, calib)
    if layer != layer0:  # re-fit every free part at the new layer
        gate, gate_ds = step_mars_gate(ctx, calib, layer, fixed)
        _set_gate(st, gate)
    gate_ds.attrs["layer_with_initial_gate"] = int(layer0)
    ds.attrs.update({f"{k}_fitted_on_safe_data": v for k, v in gate.items()})
    return layer, ds, gate_ds


def fit_autosteer(ctx: Context, dirs):
    """AutoSteer fitted on the text training pairs (SAS layer, prober, refusal head)."""
    from mars_core.autosteer import AutoSteer

    s = ctx.suite
    return AutoSteer.fit(ctx.mm, s["harmful_text_train"].texts, s["harmless_text_train"].texts, dirs,
                         seed=ctx.settings.seed, batch_size=ctx.settings.batch_size)


def comparison_steerers(ctx: Context, dirs, calib, layer: int, autosteer) -> dict[str, Any]:
    """Every method of the comparison table, at MARS's layer unless the method picks its own."""
    from mars_core.steering import MARS, ActAdd, NoSteer

    given = max(0, layer - 1) if layer > 0 else min(ctx.mm.n_layers - 1, layer + 1)
    lp = ctx.mm.family.layers_path
    kw = ctx.settings.mars_kwargs
    return {
        "none": NoSteer(),
        "actadd": ActAdd.from_directions(dirs, layer, ctx.settings.actadd_coeff, layers_path=lp),
        "actadd_all_tokens": ActAdd.from_directions(dirs, layer, ctx.settings.actadd_coeff, scope="every",
                                                    layers_path=lp),
        "autosteer": autosteer,
        "mars": MARS(calib, layer, **kw),
        "mars_no_recenter": MARS(calib, layer, recenter=False, **kw),
        "mars_fixed_strength": MARS(calib, layer, adaptive=False, alpha=ctx.settings.actadd_coeff * _gap(calib, layer),
                                    **kw),
        "mars_given_layer": MARS(calib, given, **kw),
        "mars_all_tokens": MARS(calib, layer, scope="every", **kw),
    }


def _gap(calib, layer: int) -> float:
    at = calib.at(layer)
    return float(at["p_harm"] - at["p_safe"])


def step_alignment(ctx: Context, dirs):
    from .alignment import layer_alignment

    s = ctx.suite
    return ctx.cache.get(
        "alignment",
        {"model": ctx.model_key, **_set_hashes(ctx, "harmful_image_cal", "harmless_image_cal", "neutral_text",
                                                "neutral_image", "harmful_text_train", "harmless_text_train")},
        lambda: layer_alignment(
            ctx.mm, dirs, {"image": s["harmful_image_cal"]}, {"image": s["harmless_image_cal"]},
            {"text": s["neutral_text"], "image": s["neutral_image"]},
            batch_size=ctx.settings.batch_size, seed=ctx.settings.seed,
        ),
        save_dataset, load_dataset, "nc",
    )


def step_curves(ctx: Context, dirs, calib, layer: int):
    from .curves import refusal_curves

    n = ctx.settings.curve_n_per_set
    prompts = {
        ("text", "harmful"): _cap(ctx, "harmful_text", n),
        ("text", "harmless"): _cap(ctx, "harmless_text", n),
        ("image", "harmful"): _cap(ctx, "harmful_image", n),
        ("image", "harmless"): _cap(ctx, "harmless_image", n),
    }
    layers = list(ctx.settings.curve_layers or range(ctx.mm.n_layers))
    st = ctx.settings

    def compute():
        ds = refusal_curves(
            ctx.mm, dirs, calib, prompts, layers=layers, strengths=list(st.strengths),
            methods=("none", "actadd", "mars", "mars_no_recenter", "mars_fixed_strength"),
            generate=True, max_new_tokens=st.max_new_tokens, batch_size=st.batch_size, seed=st.seed,
            mars_kwargs=st.mars_kwargs,
        )
        ds.attrs["layer"] = int(layer)
        return ds

    return ctx.cache.get(
        "refusal_curves",
        {"model": ctx.model_key, "sets": {f"{m}/{p}": v.sha256 for (m, p), v in prompts.items()},
         "layers": layers, "strengths": list(st.strengths), "tokens": st.max_new_tokens, "layer": layer,
         "mars": st.mars_kwargs},
        compute, save_dataset, load_dataset, "nc",
    )


def step_spurious(ctx: Context, calib, layer: int):
    from .spurious import spurious_refusal

    safe = {"image": _cap(ctx, "harmless_image", ctx.settings.curve_n_per_set)}
    st = ctx.settings
    return ctx.cache.get(
        "spurious_refusal",
        {"model": ctx.model_key, "safe": safe["image"].sha256, "layer": layer, "strengths": list(st.strengths),
         "tokens": st.max_new_tokens, "mars": st.mars_kwargs},
        lambda: spurious_refusal(ctx.mm, calib, safe, layer=layer, strengths=list(st.strengths), generate=True,
                                 max_new_tokens=st.max_new_tokens, batch_size=st.batch_size, seed=st.seed,
                                 mars_kwargs=_no_gain(st.mars_kwargs)),
        save_dataset, load_dataset, "nc",
    )


def _no_gain(kw: dict) -> dict:
    """MARS settings for `spurious_refusal`, which sweeps the gain itself (strength = gain)."""
    return {k: v for k, v in kw.items() if k != "gain"}


def step_stability(ctx: Context, layer: int):
    """Directions from every checkpoint, their cosines, and transplanted steering."""
    from mars_core.directions import RefusalDirections

    from .stability import direction_stability, make_transplant

    if len(ctx.checkpoints) < 2:
        ctx.log("stability: fewer than two checkpoints; skipped")
        return None
    s = ctx.suite
    harm_img = _cap(ctx, "harmful_image")

    def compute():
        models, dirs = {}, {}
        for name, loader in ctx.checkpoints.items():
            models[name] = loader()
            dirs[name] = RefusalDirections.extract(
                models[name], s["harmful_text_train"].texts, s["harmless_text_train"].texts,
                positions="last", batch_size=ctx.settings.batch_size, seed=ctx.settings.seed,
            )
        transplant = make_transplant(models, dirs, harm_img, layer=layer, coeff=ctx.settings.actadd_coeff,
                                     max_new_tokens=ctx.settings.max_new_tokens, batch_size=ctx.settings.batch_size)
        return direction_stability(dirs, k=3, transplant=transplant, seed=ctx.settings.seed)

    return ctx.cache.get(
        "stability",
        {"checkpoints": list(ctx.checkpoints), "model": ctx.model_key, "harm_img": harm_img.sha256, "layer": layer,
         **_set_hashes(ctx, "harmful_text_train", "harmless_text_train")},
        compute, save_dataset, load_dataset, "nc",
    )


def step_offset_variant(ctx: Context, name: str, layer: int):
    """Where re-centering can matter: a model variant whose image pathway carries a modality
    offset along the refusal direction (the organism's `offset` variant). Its own text
    directions and neutral calibration; spurious refusal of safe images with and without
    re-centering, and MARS vs MARS without re-centering on held-out image requests."""
    from mars_core.directions import RefusalDirections
    from mars_core.scoring import SubstringJudge
    from mars_core.steering import MARS, neutral_calibration

    from .comparison import evaluate_methods, method_comparison
    from .spurious import spurious_refusal

    s, st = ctx.suite, ctx.settings
    safe = _cap(ctx, "harmless_image", st.curve_n_per_set)
    eval_sets = {"harmful_image": _cap(ctx, "harmful_image"), "harmless_image": _cap(ctx, "harmless_image")}

    def compute():
        mm = ctx.variants[name]()
        dirs = RefusalDirections.extract(mm, s["harmful_text_train"].texts, s["harmless_text_train"].texts,
                                         batch_size=st.batch_size, seed=st.seed)
        calib = neutral_calibration(mm, dirs, s["neutral_text"], {"image": s["neutral_image"]}, batch_size=st.batch_size)
        sp = spurious_refusal(mm, calib, {"image": safe}, layer=layer, strengths=list(st.strengths), generate=True,
                              max_new_tokens=st.max_new_tokens, batch_size=st.batch_size, seed=st.seed,
                              mars_kwargs=_no_gain(st.mars_kwargs))
        steerers = {"mars": MARS(calib, layer, **st.mars_kwargs),
                    "mars_no_recenter": MARS(calib, layer, recenter=False, **st.mars_kwargs)}
        per = evaluate_methods(mm, steerers, eval_sets, judge=SubstringJudge(), max_new_tokens=st.max_new_tokens,
                               batch_size=st.batch_size, seed=st.seed)
        cmp = method_comparison(per, n_boot=st.n_boot, seed=st.seed)
        for ds in (sp, cmp):
            ds.attrs.update({"variant": name, "layer": int(layer)})
        return {"spurious": sp, "comparison": cmp}

    key = {"variant": name, "model": ctx.model_key, "safe": safe.sha256, "layer": layer, "mars": st.mars_kwargs,
           "sets": {k: v.sha256 for k, v in eval_sets.items()}, "strengths": list(st.strengths),
           **_set_hashes(ctx, "harmful_text_train", "harmless_text_train", "neutral_text", "neutral_image")}
    done: dict[str, Any] = {}

    def once(part: str):  # both cached results come from one computation
        if not done:
            done.update(compute())
        return done[part]

    sp = ctx.cache.get(f"spurious_{name}", key, lambda: once("spurious"), save_dataset, load_dataset, "nc")
    cmp = ctx.cache.get(f"comparison_{name}", key, lambda: once("comparison"), save_dataset, load_dataset, "nc")
    return sp, cmp


def step_comparison(ctx: Context, dirs, calib, layer: int):
    from mars_core.scoring import SubstringJudge

    from .comparison import evaluate_methods, method_comparison
    from .suite import caption_check

    eval_sets = {
        "harmful_text": _cap(ctx, "harmful_text"),
        "harmless_text": _cap(ctx, "harmless_text"),
        "harmful_image": _cap(ctx, "harmful_image"),
        "harmless_image": _cap(ctx, "harmless_image"),
        "caption_accuracy": _cap(ctx, "captions"),
    }
    st = ctx.settings

    def compute():
        steerers = comparison_steerers(ctx, dirs, calib, layer, fit_autosteer(ctx, dirs))
        per = evaluate_methods(ctx.mm, steerers, eval_sets, judge=SubstringJudge(), caption_check=caption_check,
                               max_new_tokens=st.max_new_tokens, batch_size=st.batch_size, seed=st.seed)
        ds = method_comparison(per, n_boot=st.n_boot, seed=st.seed)
        ds.attrs.update({"layer": int(layer), "steerers": json.dumps(per.provenance.get("steerers", {}))})
        return ds

    return ctx.cache.get(
        "comparison",
        {"model": ctx.model_key, "sets": {k: v.sha256 for k, v in eval_sets.items()}, "layer": layer,
         "tokens": st.max_new_tokens, "coeff": st.actadd_coeff, "boot": st.n_boot, "seed": st.seed,
         "mars": st.mars_kwargs},
        compute, save_dataset, load_dataset, "nc",
    )


# -- driver ---------------------------------------------------------------------------------
def organism_context(out: Path, *, fresh: bool, settings: Settings, log, run_dir: str | Path | None = None
                     ) -> Context:
    """The built-in organism, its prompt suite and its training checkpoints.

    `run_dir`: instead of the shipped weights, a training run of `python -m
    mars_core.organism.train --out RUN_DIR` (its `stage3/` is the model, its other stage folders
    the checkpoints of the stability analysis; no `offset` variant is built for it)."""
    from mars_core.errors import InputError
    from mars_core.model import load_model
    from mars_core.organism import load_organism
    from mars_core.organism.load import WEIGHTS, load_checkpoint, weights_dir

    from .suite import organism_suite

    if run_dir is None:
        mm = load_model(*load_organism("natural"), family="llava")
        mm.model_id = "mars-organism/natural"
        paths = {name: WEIGHTS / "checkpoints" / name for name in ("stage1", "stage2")}
        paths["stage3"] = weights_dir("natural")
        paths["stage4_extra"] = WEIGHTS / "checkpoints" / "stage4_extra"
    else:
        run_dir = Path(run_dir)
        if not (run_dir / "stage3" / "model.safetensors").exists():
            raise InputError(f"{run_dir} is not an organism training run (no stage3/model.safetensors); give the "
                             "--out folder of `python -m mars_core.organism.train`")
        mm = load_model(*load_checkpoint(run_dir / "stage3"), family="llava")
        mm.model_id = f"mars-organism/run:{run_dir.resolve().name}"
        paths = {name: run_dir / name for name in ("stage1", "stage2", "stage3", "stage4_extra")
                 if (run_dir / name / "model.safetensors").exists()}
    ckpts = {name: (lambda p=path: load_model(*load_checkpoint(p))) for name, path in paths.items()}
    ctx = Context(mm, f"{mm.model_id}:{mm.config_hash}:{_weights_hash(mm)}", organism_suite(settings.seed), ckpts,
                  settings, StepCache(out / ".mars_cache", fresh), out, log)
    if run_dir is None:
        ctx.variants["offset"] = lambda: load_model(*load_organism("offset"), family="llava")
    return ctx


def hub_context(model_id: str, out: Path, *, fresh: bool, settings: Settings, log, remote: bool = False,
                dtype: str | None = None, device_map: str | None = None) -> Context:
    """A hub model (or local directory) with the data-free typographic suite."""
    from mars_core.model import load_model
    from mars_core.steering import media_side

    from .suite import typographic_suite

    mm = load_model(model_id, dtype=dtype, device_map=device_map, remote=remote)
    suite = typographic_suite(settings.seed, image_size=media_side(mm, default=224))
    return Context(mm, f"{model_id}:{mm.config_hash}", suite, {}, settings, StepCache(out / ".mars_cache", fresh),
                   out, log)


def _weights_hash(mm) -> str:
    """Hash of the model's parameters (cheap for small models; cache keys must see retraining)."""
    import hashlib

    h = hashlib.sha256()
    for name, p in sorted(mm.hf.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def run(ctx: Context, figures: bool = True) -> dict[str, Path]:
    """Run every step for `ctx`, write data (and, if `figures`, the figures and the comparison
    table); returns {artifact name: path}."""
    import dataclasses

    ctx.settings = dataclasses.replace(ctx.settings)  # fitted values (the MARS gate) never leak to the caller
    out, log = ctx.out, ctx.log
    data, figs = out / "data", out / "figures"
    written: dict[str, Path] = {}
    t0 = time.perf_counter()

    def note(name: str, path: Path):
        written[name] = path
        log(f"wrote {path}")

    def save_nc(name: str, ds):
        note(name, save_dataset(ds, data / f"{name}.nc"))

    def stage(msg: str):
        log(f"[{time.perf_counter() - t0:6.1f}s] {msg}")

    stage("text refusal directions")
    dirs = step_directions(ctx)
    note("directions", dirs.save(data / "directions.safetensors"))
    stage("text direction selection")
    save_nc("text_selection", step_text_selection(ctx, dirs))
    stage("MARS calibration and layer selection")
    calib = step_calibration(ctx, dirs)
    note("calibration", calib.save(data / "calibration.safetensors"))
    layer, layer_ds, gate_ds = step_mars_layer_and_gate(ctx, calib)
    save_nc("mars_layer_selection", layer_ds)
    if gate_ds is not None:
        save_nc("mars_gate", gate_ds)
    log(f"MARS layer: {layer}, gate: {ctx.settings.mars_kwargs}")
    stage("alignment")
    datasets = {"alignment": step_alignment(ctx, dirs)}
    stage("refusal curves")
    datasets["refusal_curves"] = step_curves(ctx, dirs, calib, layer)
    stage("spurious refusal")
    datasets["spurious_refusal"] = step_spurious(ctx, calib, layer)
    stage("direction stability")
    stab = step_stability(ctx, layer)
    if stab is not None:
        datasets["stability"] = stab
    stage("method comparison")
    datasets["comparison"] = step_comparison(ctx, dirs, calib, layer)
    variant_data = {}
    for vname in ctx.variants:
        stage(f"re-centering on the {vname!r} variant")
        variant_data[f"spurious_{vname}_variant"], variant_data[f"comparison_{vname}_variant"] = (
            step_offset_variant(ctx, vname, layer))
    for name, ds in {**datasets, **variant_data}.items():
        save_nc(name, ds)
    if figures:
        stage("figures")
        written.update(write_figures(datasets, figs, log))
        written.update(write_variant_figures(variant_data, figs, log))
    reused = sum(1 for e in ctx.cache.events if e[1] == "reused")
    stage(f"done: {len(written)} artifacts, {reused} of {len(ctx.cache.events)} cached steps reused")
    return written


def write_variant_figures(variant_data: dict[str, Any], figs: Path, log=print) -> dict[str, Path]:
    """The spurious-refusal figure and the re-centering table of each model variant."""
    from . import plotting
    from .comparison import comparison_table_markdown

    written: dict[str, Path] = {}
    for name, ds in variant_data.items():
        if name.startswith("spurious_"):
            plotting.plot_spurious(ds, out_dir=figs, name=name)
            for ext in (".pdf", ".png"):
                written[f"figure:{name}{ext}"] = figs / f"{name}{ext}"
        else:
            head = (f"Re-centering on the `{ds.attrs.get('variant')}` organism variant (MARS at layer "
                    f"{ds.attrs.get('layer')}):\n\n")
            written[f"{name}.md"] = atomic_write_text(figs / f"{name}.md", head + comparison_table_markdown(ds) + "\n")
    for path in written.values():
        log(f"wrote {path}")
    return written


def write_figures(datasets: dict[str, Any], figs: Path, log=print) -> dict[str, Path]:
    """Every figure of every Dataset, plus the comparison table; returns {name: path}."""
    from . import plotting
    from .comparison import comparison_json, comparison_table_markdown

    written: dict[str, Path] = {}

    def note(name: str, path: Path):
        written[name] = Path(path)
        log(f"wrote {path}")

    for ds in datasets.values():
        for path in plotting.plot_dataset(ds, figs):
            note(f"figure:{Path(path).name}", Path(path))
    cmp = datasets.get("comparison")
    if cmp is None:
        return written
    note("comparison.md", atomic_write_text(figs / "comparison.md", comparison_table_markdown(cmp) + "\n"))
    note("comparison.json", atomic_write_json(figs / "comparison.json", comparison_json(cmp)))
    return written
