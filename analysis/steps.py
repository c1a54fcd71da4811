"""The steps of the MARS study, each a function of exactly what it reads (`analysis.graph`).

Graph values (the sources `analysis.reproduce.study_sources` builds, then each step's output):

  mm                   the MarsModel
  checkpoints          {name: ModelRef} training checkpoints (stability)
  variant_<name>       ModelRef of a model variant (re-centering where the offset points along r)
  harmful_text_train, harmless_text_train   text requests of the direction (PromptSet)
  harmful_text_sel, harmless_text_sel       held-out text requests for direction selection
  neutral_text, neutral_media               re-centering baseline and {modality: neutral set}
  gate_safe            {name: safe PromptSet} the MARS gate is fitted on (calibration splits)
  align_harmful, align_harmless             {modality: PromptSet} calibration image requests
  curve_sets           {(modality, "harmful"|"harmless"): PromptSet} for the strength sweeps
  spurious_safe        {modality: harmless PromptSet}
  stability_harmful    harmful image requests steered across checkpoints
  eval_sets            {metric: PromptSet} of the comparison (held-out)
  protocol_sets        {name: PromptSet} every held-out set of the protocol (topics, templates,
                       renderers, object-less images, look-alikes); strict_judge its judge
  settings             seed, batch_size, max_new_tokens, strengths, curve_layers, actadd_coeff,
                       n_boot, mars_gate (fixed parts), mars_grids, mars_max_increase

Every fitted choice (MARS layer and gate, AutoSteer) reads only text and safe calibration data.
`STEPS` is the graph; `variant_steps(name)` adds the steps of one model variant.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

from mars_core.datasets import load_dataset, save_dataset

from .graph import Step

METHODS = ("none", "actadd", "actadd_all_tokens", "autosteer", "mars", "mars_no_recenter", "mars_fixed_strength",
           "mars_given_layer", "mars_all_tokens")
"""The comparison's methods (`comparison_steerers`); `mars evaluate` takes any subset."""


# ---------------------------------------------------------------------------- persistence
def _save_obj(v, p):
    v.save(p)


def _load_directions(p, reads):
    from mars_core.directions import RefusalDirections

    return RefusalDirections.load(p, model=reads["mm"])


def _load_calibration(p, reads):
    from mars_core.steering import MarsCalibration

    return MarsCalibration.load(p, model=reads["mm"])


def _load_mars(p, reads):
    from mars_core.steering import MARS

    return MARS.load(p, model=reads["mm"])


def _load_autosteer(p, reads):
    from mars_core.autosteer import AutoSteer

    return AutoSteer.load(p)


def _save_ds(v, p):
    save_dataset(v, p)


def _load_ds(p, reads):
    return load_dataset(p)


def _save_dss(v: Mapping[str, Any], p: Path):
    p.mkdir(parents=True)
    for name, ds in v.items():
        save_dataset(ds, p / f"{name}.nc")


def _load_dss(p: Path, reads):
    return {f.stem: load_dataset(f) for f in sorted(p.glob("*.nc"))}


def _save_json(v, p):
    p.write_text(json.dumps(v), encoding="utf-8")


def _load_json(p, reads):
    return json.loads(p.read_text(encoding="utf-8"))


# ---------------------------------------------------------------------------- the steps
def directions(mm, harmful_text_train, harmless_text_train, batch_size, seed):
    """Text refusal directions: difference of means at every layer and post-instruction position."""
    from mars_core.directions import RefusalDirections

    return RefusalDirections.extract(mm, harmful_text_train.texts, harmless_text_train.texts, batch_size=batch_size,
                                     seed=seed, dataset_names=(harmful_text_train.name, harmless_text_train.name),
                                     progress=False)


def text_selection(mm, directions, harmful_text_sel, harmless_text_sel, selection_candidates, batch_size):
    """The refusal-direction paper's (layer, position) scoring on held-out text (an analysis);
    candidates: {"layers", "positions"} (None: every extracted one)."""
    from mars_core.scoring import refusal_token_ids
    from mars_core.selection import select_direction

    return select_direction(mm, directions, harmful_text_sel.texts, harmless_text_sel.texts,
                            layers=selection_candidates["layers"], positions=selection_candidates["positions"],
                            refusal_ids=refusal_token_ids(mm.tokenizer), batch_size=batch_size)


def calibration(mm, directions, neutral_text, neutral_media, batch_size):
    """MARS's calibration: directions, centroid projections and the neutral modality offsets."""
    from mars_core.steering import neutral_calibration

    return neutral_calibration(mm, directions, neutral_text, neutral_media, batch_size=batch_size)


def mars(mm, calibration, harmful_text_train, gate_safe, neutral_media, mars_gate, mars_grids, mars_max_increase,
         mars_layers, batch_size):
    """MARS fitted from text and safe data (`fit_mars`): layer, then gate, then the layer again."""
    from mars_core.steering import fit_mars

    return fit_mars(mm, calibration, harmful_text_train, gate_safe, neutral=neutral_media, gate=mars_gate,
                    layers=mars_layers, max_increase=mars_max_increase, batch_size=batch_size, **mars_grids)


def mars_layer(mars):
    """MARS's intervention layer (steps that need only the layer read this, not the gate)."""
    return int(mars.layer)


def autosteer(mm, directions, harmful_text_train, harmless_text_train, seed, batch_size):
    """AutoSteer fitted on the text pairs (SAS layer, prober, refusal head)."""
    from mars_core.autosteer import AutoSteer

    return AutoSteer.fit(mm, harmful_text_train.texts, harmless_text_train.texts, directions, seed=seed,
                         batch_size=batch_size)


def alignment(mm, directions, align_harmful, align_harmless, neutral_text, neutral_media, batch_size, seed):
    """Per-layer alignment of the text direction with image/video requests and the offsets."""
    from .alignment import layer_alignment

    return layer_alignment(mm, directions, align_harmful, align_harmless, {"text": neutral_text, **neutral_media},
                           batch_size=batch_size, seed=seed)


def refusal_curves(mm, directions, calibration, mars, curve_sets, curve_layers, strengths, max_new_tokens, batch_size,
                   seed):
    """Refusal against strength and layer for the naive and MARS methods (MARS with its fitted gate)."""
    from .curves import refusal_curves as curves

    layers = list(curve_layers) if curve_layers is not None else list(range(mm.n_layers))
    ds = curves(mm, directions, calibration, curve_sets, layers=layers, strengths=list(strengths),
                methods=("none", "actadd", "mars", "mars_no_recenter", "mars_fixed_strength"), generate=True,
                max_new_tokens=max_new_tokens, batch_size=batch_size, seed=seed, mars_kwargs=_operator(mars))
    ds.attrs["layer"] = int(mars.layer)
    return ds


def spurious_refusal(mm, calibration, mars, spurious_safe, strengths, max_new_tokens, batch_size, seed):
    """Spurious refusal of safe multimodal inputs vs MARS gain, with and without re-centering."""
    from .spurious import spurious_refusal as spurious

    kw = {k: v for k, v in _operator(mars).items() if k not in ("recenter", "adaptive", "gain", "gain_units")}
    return spurious(mm, calibration, spurious_safe, layer=mars.layer, strengths=list(strengths), generate=True,
                    max_new_tokens=max_new_tokens, batch_size=batch_size, seed=seed, mars_kwargs=kw)


def stability(checkpoints, harmful_text_train, harmless_text_train, stability_harmful, mars_layer, actadd_coeff,
              max_new_tokens, batch_size, seed):
    """Directions of every training checkpoint: cosines, principal angles, transplanted steering."""
    from mars_core.directions import RefusalDirections

    from .stability import direction_stability, make_transplant

    models = {name: ref.load() for name, ref in checkpoints.items()}
    dirs = {name: RefusalDirections.extract(m, harmful_text_train.texts, harmless_text_train.texts, positions="last",
                                            batch_size=batch_size, seed=seed, progress=False)
            for name, m in models.items()}
    transplant = make_transplant(models, dirs, stability_harmful, layer=mars_layer, coeff=actadd_coeff,
                                 max_new_tokens=max_new_tokens, batch_size=batch_size)
    return direction_stability(dirs, k=3, transplant=transplant, seed=seed)


def comparison_steerers(mm, directions, calibration, mars, autosteer, actadd_coeff) -> dict[str, Any]:
    """Every method of the comparison, at MARS's layer unless the method picks its own; the MARS
    variants keep the fitted gate and change one part each."""
    from mars_core.steering import ActAdd, NoSteer

    layer = mars.layer
    given = layer - 1 if layer > 0 else min(mm.n_layers - 1, layer + 1)
    lp = mm.family.layers_path
    gap = calibration.at(layer)["gap"]
    out = {
        "none": NoSteer(),
        "actadd": ActAdd.from_directions(directions, layer, actadd_coeff, layers_path=lp),
        "actadd_all_tokens": ActAdd.from_directions(directions, layer, actadd_coeff, scope="every", layers_path=lp),
        "autosteer": autosteer,
        "mars": mars,
        "mars_no_recenter": mars.variant(recenter=False),
        "mars_fixed_strength": mars.variant(adaptive=False, alpha=actadd_coeff * gap),
        "mars_given_layer": mars.variant(layer=given),
        "mars_all_tokens": mars.variant(scope="every"),
    }
    return {k: v for k, v in out.items() if v is not None}


def comparison(mm, directions, calibration, mars, autosteer, eval_sets, actadd_coeff, max_new_tokens, batch_size,
               n_boot, seed):
    """Every method on every held-out evaluation set, judged, with paired bootstrap CIs."""
    from mars_core.judges import utility_check
    from mars_core.scoring import SubstringJudge

    from .comparison import evaluate_methods, method_comparison

    steerers = comparison_steerers(mm, directions, calibration, mars, autosteer, actadd_coeff)
    per = evaluate_methods(mm, steerers, eval_sets, judge=SubstringJudge(), caption_check=utility_check,
                           max_new_tokens=max_new_tokens, batch_size=batch_size, seed=seed)
    ds = method_comparison(per, n_boot=n_boot, seed=seed)
    ds.attrs.update({"layer": int(mars.layer), "steerers": per.provenance.get("steerers", {}),
                     "mars_gate": mars.gate, "mars_fit": mars.fit_info})
    return ds


def heldout(mm, directions, calibration, mars, protocol_sets, strict_judge, protocol_tokens, actadd_coeff, batch_size,
            seed):
    """The held-out protocol (`analysis.protocol`): unsteered, naive ActAdd (1x the text gap at
    MARS's layer) and MARS with and without re-centering on every held-out set, read whole by the
    strict judge, beside the substring judge, with utility and first-token KL."""
    from mars_core.judges import utility_check

    from .protocol import heldout_protocol

    every = comparison_steerers(mm, directions, calibration, mars, None, actadd_coeff)
    steerers = {k: every[k] for k in ("none", "actadd", "mars", "mars_no_recenter")}
    utility = {n: utility_check for n, ps in protocol_sets.items() if n.startswith("captions")}
    ds = heldout_protocol(mm, steerers, protocol_sets, strict_judge, utility=utility, max_new_tokens=protocol_tokens,
                          batch_size=batch_size, seed=seed)
    ds.attrs.update({"layer": int(mars.layer), "mars_gate": mars.gate})
    return ds


def shared_structure(mm, harmful_text_train, harmless_text_train, structure_text, eval_sets, batch_size, seed):
    """Harm signal of held-out image requests along the text direction vs random topic splits
    (the splits' text: `structure_text` {"harmful", "harmless"} when given, else the direction's)."""
    from .protocol import shared_structure as structure

    return structure(mm, harmful_text_train, harmless_text_train, eval_sets["harmful_image"], eval_sets["harmless_image"],
                     split_text=(structure_text["harmful"], structure_text["harmless"]) if structure_text else None,
                     batch_size=batch_size, seed=seed)


def variant_study(variant, harmful_text_train, harmless_text_train, neutral_text, neutral_media, mars, spurious_safe,
                  variant_eval_sets, strengths, max_new_tokens, batch_size, n_boot, seed):
    """Re-centering on a model variant: its own directions and neutral calibration, MARS with the
    main model's layer and fitted gate; spurious refusal of safe images with and without
    re-centering, and MARS vs MARS without re-centering on held-out image requests."""
    from mars_core.scoring import SubstringJudge
    from mars_core.steering import MARS

    from .comparison import evaluate_methods, method_comparison

    mm = variant.load()
    dirs = directions(mm, harmful_text_train, harmless_text_train, batch_size, seed)
    calib = calibration(mm, dirs, neutral_text, neutral_media, batch_size)
    op = MARS(calib, mars.layer, **_operator(mars))
    sp = spurious_refusal(mm, calib, op, spurious_safe, strengths, max_new_tokens, batch_size, seed)
    per = evaluate_methods(mm, {"mars": op, "mars_no_recenter": op.variant(recenter=False)}, variant_eval_sets,
                           judge=SubstringJudge(), max_new_tokens=max_new_tokens, batch_size=batch_size, seed=seed)
    cmp = method_comparison(per, n_boot=n_boot, seed=seed)
    at = calib.at(mars.layer)
    ratio = {m: float(o @ at["r"]) / at["gap"] for m, o in at["offsets"].items()}
    for ds in (sp, cmp):
        ds.attrs.update({"variant": variant.name, "model_variant": variant.name, "layer": int(mars.layer),
                         "mars_gate": mars.gate, "gate_from": "the main model's fitted MARS",
                         "offset_projection_over_text_gap": ratio})
    return {f"spurious_{variant.name}_variant": sp, f"comparison_{variant.name}_variant": cmp}


def _operator(mars) -> dict[str, Any]:
    """MARS's settings without the layer (for analyses that sweep the layer or the strength)."""
    return {k: v for k, v in mars.config.items() if k != "layer"}


STEPS = [
    Step("directions", directions, _save_obj, _load_directions, "safetensors"),
    Step("text_selection", text_selection, _save_ds, _load_ds, "nc"),
    Step("calibration", calibration, _save_obj, _load_calibration, "safetensors"),
    Step("mars", mars, _save_obj, _load_mars, "mars"),
    Step("mars_layer", mars_layer, _save_json, _load_json, "json"),
    Step("autosteer", autosteer, _save_obj, _load_autosteer, "autosteer"),
    Step("alignment", alignment, _save_ds, _load_ds, "nc"),
    Step("refusal_curves", refusal_curves, _save_ds, _load_ds, "nc"),
    Step("spurious_refusal", spurious_refusal, _save_ds, _load_ds, "nc"),
    Step("stability", stability, _save_ds, _load_ds, "nc"),
    Step("comparison", comparison, _save_ds, _load_ds, "nc"),
    Step("heldout", heldout, _save_ds, _load_ds, "nc"),
    Step("shared_structure", shared_structure, _save_ds, _load_ds, "nc"),
]
"""The study's graph, in order (each step reads only sources and earlier steps)."""

BUILD_METHODS = ("directions", "calibration", "mars", "autosteer")
"""The steps `mars evaluate` needs to build its methods."""


def variant_steps(name: str) -> list[Step]:
    """The steps of model variant `name` (source `variant_<name>`, eval sets `variant_eval_sets`)."""
    return [Step(f"variant_{name}_study", variant_study, _save_dss, _load_dss, "study",
                 bind={"variant": f"variant_{name}"})]
