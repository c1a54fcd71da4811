"""Refusal-score curves: layer x strength x modality x prompt set x method, per prompt.

For every (modality, prompt_set) PromptSet, every method, intervention layer and strength,
each prompt gets
  - `score`: the first-token refusal log-odds (`mars_core.scoring.first_token_refusal_score`)
    of the steered model, one nnsight trace per batch (`Steerer.last_logits`);
  - `refused`: the judge's verdict (1/0) on the steered greedy generation of
    `max_new_tokens` tokens (one `generate` per batch) when `generate=True`, else NaN.

Built-in methods (names of docs/datasets.md; `strength` is in units of the text mean
difference norm ||mu_harm - mu_safe|| at the layer, i.e. of the gap p_harm - p_safe):

  none                 NoSteer (constant along layer and strength)
  actadd               ActAdd.from_directions(directions, layer, coeff=strength), last prompt
                       position at prefill
  actadd_all_tokens    the same, also at every generated position (scope "every")
  ablation             DirectionalAblation of the layer's unit direction at every layer
                       (constant along strength)
  mars                 MARS(calibration, layer, **mars_kwargs) (adaptive: constant along strength)
  mars_no_recenter     MARS with recenter=False
  mars_all_tokens      MARS with scope="every"
  mars_fixed_strength  MARS with adaptive=False, alpha = strength * gap (gate off, trust region on)

Other methods (e.g. a fitted `mars_core.autosteer.AutoSteer`) are given as
`methods={name: factory}` with `factory(layer, strength) -> Steerer`, evaluated at every
layer and strength; a built-in name mapped to None uses the built-in.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import numpy as np
import xarray as xr

from mars_core.directions import RefusalDirections, model_shape
from mars_core.errors import IncompatibleModelError, InputError
from mars_core.prompts import PromptSet

from ._common import (
    PROMPT_SETS,
    dataset_provenance,
    attach_coord_attrs,
    build_batches,
    check_judge,
    check_layers,
    check_model_takes,
    check_modality,
    check_prompt_set,
    judge_generations,
    order_modalities,
    resolve_refusal_ids,
    score_batches,
    var,
)

__all__ = ["refusal_curves", "BUILTIN_METHODS", "DEFAULT_METHODS"]

DEFAULT_METHODS = ("none", "actadd", "mars", "mars_no_recenter")

#: name -> (uses layer, uses strength, needs directions, needs calibration)
BUILTIN_METHODS: dict[str, tuple[bool, bool, bool, bool]] = {
    "none": (False, False, False, False),
    "actadd": (True, True, True, False),
    "actadd_all_tokens": (True, True, True, False),
    "ablation": (True, False, True, False),
    "mars": (True, False, False, True),
    "mars_no_recenter": (True, False, False, True),
    "mars_all_tokens": (True, False, False, True),
    "mars_fixed_strength": (True, True, False, True),
}
_MARS_VARIANTS = {
    "mars": {},
    "mars_no_recenter": {"recenter": False},
    "mars_all_tokens": {"scope": "every"},
    "mars_fixed_strength": {"adaptive": False},
}


def _builtin_factory(name: str, directions: Any, calibration: Any, mars_kwargs: dict) -> Callable[[int, float], Any]:
    from mars_core.steering import MARS, ActAdd, DirectionalAblation, NoSteer

    if name == "none":
        return lambda layer, strength: NoSteer()
    if name in ("actadd", "actadd_all_tokens"):
        scope = "every" if name == "actadd_all_tokens" else "first"
        return lambda layer, strength: ActAdd.from_directions(directions, layer, coeff=strength, pos=-1, scope=scope)
    if name == "ablation":
        return lambda layer, strength: DirectionalAblation(directions.direction(layer, -1, unit=True))
    kw = {**mars_kwargs, **_MARS_VARIANTS[name]}
    if name == "mars_fixed_strength":
        return lambda layer, strength: MARS(calibration, layer, **{**kw, "alpha": strength * calibration.at(layer)["gap"]})
    return lambda layer, strength: MARS(calibration, layer, **kw)


def _recenters(name: str, mars_kwargs: dict) -> bool:
    return name.startswith("mars") and {**mars_kwargs, **_MARS_VARIANTS.get(name, {})}.get("recenter", True)


def refusal_curves(
    mm: Any,
    directions: RefusalDirections | None,
    calibration: Any,
    prompts: Mapping[tuple[str, str], PromptSet],
    *,
    layers: Sequence[int],
    strengths: Sequence[float],
    methods: Sequence[str] | Mapping[str, Callable[[int, float], Any] | None] = DEFAULT_METHODS,
    generate: bool = False,
    max_new_tokens: int = 8,
    judge: Any = None,
    batch_size: int = 8,
    refusal_ids: Sequence[int] | None = None,
    mars_kwargs: Mapping[str, Any] | None = None,
    seed: int | None = None,
) -> xr.Dataset:
    """Per-prompt refusal score (and judged refusal) under each method, layer and strength.

    mm: MarsModel. directions: text `RefusalDirections` (needed by actadd / ablation).
    calibration: `MarsCalibration` (needed by the mars methods; its offsets must cover every
    non-text modality a re-centering MARS variant sees). prompts: {(modality, prompt_set):
    PromptSet}, modality "text"/"image"/"video", prompt_set "harmful"/"harmless".
    layers: intervention layers; strengths: steering coefficients (module docstring).
    methods: built-in names or {name: factory(layer, strength) -> Steerer} (module docstring).
    generate: also generate `max_new_tokens` tokens and judge them with `judge` (default
    `SubstringJudge()`). refusal_ids: refusal-start token ids (default from the tokenizer).
    mars_kwargs: extra MARS settings (gain, tau, margin, ...) for every mars variant.

    Returns the Dataset of docs/datasets.md "refusal curves": dims method, modality,
    prompt_set, layer, strength, prompt (0..max set size - 1; shorter sets and absent
    (modality, prompt_set) pairs are NaN); vars score (log-odds) and refused (0/1, NaN where not
    generated). Methods that ignore strength (or layer) are computed once and repeated.
    """
    prompts = dict(prompts or {})
    if not prompts:
        raise InputError("prompts is empty; give {(modality, 'harmful'|'harmless'): PromptSet}")
    for key, ps in prompts.items():
        if not (isinstance(key, tuple) and len(key) == 2):
            raise InputError(f"prompt key {key!r}: use (modality, prompt_set), e.g. ('image', 'harmful')")
        m, p = key
        check_modality(m, f"prompts[{key!r}]")
        if p not in PROMPT_SETS:
            raise InputError(f"prompts[{key!r}]: prompt_set {p!r}; use one of {PROMPT_SETS}")
        check_prompt_set(ps, f"prompts[{key!r}]", m)
        check_model_takes(mm, m, f"prompts[{key!r}]")

    if isinstance(methods, str):
        methods = [methods]
    spec = dict(methods) if isinstance(methods, Mapping) else {name: None for name in methods}
    if not spec:
        raise InputError(f"methods is empty; use some of {sorted(BUILTIN_METHODS)}")
    if len(spec) != len(methods):
        raise InputError(f"duplicate method names in {list(methods)}")
    mars_kwargs = dict(mars_kwargs or {})
    factories: dict[str, tuple[Callable, bool, bool]] = {}
    for name, fac in spec.items():
        if fac is None:
            if name not in BUILTIN_METHODS:
                raise InputError(
                    f"unknown method {name!r}; built-ins are {sorted(BUILTIN_METHODS)}, others need a factory: "
                    "methods={name: lambda layer, strength: steerer}"
                )
            uses_layer, uses_strength, need_dir, need_cal = BUILTIN_METHODS[name]
            if need_dir and directions is None:
                raise InputError(f"method {name!r} needs RefusalDirections; directions is None")
            if need_cal and calibration is None:
                raise InputError(f"method {name!r} needs a MarsCalibration; calibration is None")
            factories[name] = (_builtin_factory(name, directions, calibration, mars_kwargs), uses_layer, uses_strength)
        elif callable(fac):
            factories[name] = (fac, True, True)
        else:
            raise InputError(f"methods[{name!r}] must be None (built-in) or factory(layer, strength) -> Steerer")

    if directions is not None and model_shape(mm) != (int(directions.n_layers), int(directions.d_model)):
        raise IncompatibleModelError(
            f"the directions are for {directions.n_layers} layers / d_model={directions.d_model}; the model has "
            f"{mm.n_layers} / {mm.d_model}"
        )
    if calibration is not None:
        calibration.check_model(mm)
    lay = check_layers(mm, layers)
    st = np.asarray([float(s) for s in np.atleast_1d(strengths)], dtype=np.float64)
    if st.size == 0:
        raise InputError("strengths is empty; give at least one strength")
    if not np.isfinite(st).all() or len(set(st.tolist())) != st.size:
        raise InputError(f"strengths must be finite and distinct, got {st.tolist()}")
    for name in factories:  # fail before any forward pass if a layer is missing
        if spec[name] is None and BUILTIN_METHODS[name][0]:
            for l in lay:
                if BUILTIN_METHODS[name][3]:
                    calibration.index(l)
                else:
                    directions.direction(l, -1)
    mods = order_modalities(m for m, _ in prompts)
    sets = [p for p in PROMPT_SETS if any(q == p for _, q in prompts)]
    for name in factories:
        if spec[name] is None and _recenters(name, mars_kwargs):
            missing = [m for m in mods if m != "text" and m not in calibration.modalities]
            if missing:
                raise InputError(
                    f"method {name!r} re-centers {missing} inputs but the calibration has offsets only for "
                    f"{list(calibration.modalities)}; calibrate those modalities (calibrate_mars)"
                )
    if generate:
        judge = check_judge(judge)
    rid = resolve_refusal_ids(mm, refusal_ids)

    n_max = max(len(ps) for ps in prompts.values())
    shape = (len(factories), len(mods), len(sets), len(lay), st.size, n_max)
    score = np.full(shape, np.nan)
    refused = np.full(shape, np.nan)
    for (m, p), ps in prompts.items():
        im, ip, n = mods.index(m), sets.index(p), len(ps)
        batches = build_batches(mm, ps, batch_size)
        for i, (name, (fac, uses_layer, uses_strength)) in enumerate(factories.items()):
            for il, layer in enumerate(lay if uses_layer else lay[:1]):
                for js, s in enumerate(st if uses_strength else st[:1]):
                    steerer = fac(layer, float(s))
                    lsel = slice(il, il + 1) if uses_layer else slice(None)
                    ssel = slice(js, js + 1) if uses_strength else slice(None)
                    sc, _ = score_batches(mm, steerer, batches, rid)
                    score[i, im, ip, lsel, ssel, :n] = sc
                    if generate:
                        refused[i, im, ip, lsel, ssel, :n] = judge_generations(
                            mm, steerer, ps, judge, batch_size=batch_size, max_new_tokens=max_new_tokens)

    dims = ("method", "modality", "prompt_set", "layer", "strength", "prompt")
    ds = xr.Dataset(
        {
            "score": var(dims, score, "first-token refusal score", "log-odds"),
            "refused": var(dims, refused, "judged refusal", "1"),
        },
        coords={"method": list(factories), "modality": mods, "prompt_set": sets,
                "layer": np.asarray(lay, dtype=np.int64), "strength": st, "prompt": np.arange(n_max)},
        attrs=dataset_provenance(
            "curves", mm, {f"{p}_{m}": ps for (m, p), ps in prompts.items()}, seed=seed,
            generate=bool(generate), max_new_tokens=int(max_new_tokens) if generate else 0,
            judge=getattr(judge, "name", type(judge).__name__) if generate else "",
            mars_kwargs=dict(mars_kwargs),
            refusal_ids=rid,
            custom_methods=[n for n, f in spec.items() if f is not None],
        ),
    )
    return attach_coord_attrs(ds)
