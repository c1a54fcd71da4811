"""One call that fits MARS's layer and gate from text and safe data: `fit_mars`.

    mars = fit_mars(mm, calib, harmful_texts, {"harmless_text": ..., "harmless_image": ...})

1. The layer (`select_mars_layer`): MARS with the initial gate `init` at every calibrated layer,
   on harmful TEXT prompts (refusal it induces) and object-less neutral inputs (spurious refusal
   it adds); the most inducing layer within the spurious bound.
2. The gate at that layer (`select_mars_gate`): the most permissive (tau, gain, margin) on the
   grids that adds at most `max_increase` first-token refusal to every safe set.
3. The layer re-chosen with the fitted gate; if it moved, the gate is re-fitted there (one
   alternation; `fit_info` says what happened).
No harmful multimodal prompt is read. A part of the gate given in `gate` is kept fixed; a given
`layer` is used as is.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from ..errors import InputError
from .calibration import MarsCalibration
from .gate import DEFAULT_GAINS, DEFAULT_MARGINS, DEFAULT_TAUS, select_mars_gate
from .layer import select_mars_layer
from .mars import MARS, OPERATOR_KWARGS

INITIAL_GATE = {"tau": 0.0, "gain": 2.0, "margin": 0.5}
"""The gate layer selection starts from (its first pass), before the gate is fitted."""


def _texts(x: Any) -> list[str]:
    texts = list(getattr(x, "texts", x))
    if not texts or not all(isinstance(t, str) for t in texts):
        raise InputError("harmful_texts must be a non-empty list of strings (or a text PromptSet)")
    if getattr(x, "modality", "text") != "text":
        raise InputError("MARS is fitted on harmful TEXT prompts only; give a text prompt set")
    return texts


def fit_mars(
    mm: Any,
    calibration: MarsCalibration,
    harmful_texts: Any,
    safe_sets: Mapping[str, Any],
    *,
    neutral: Mapping[str, Any] | None = None,
    layer: int | None = None,
    layers: Sequence[int] | None = None,
    gate: Mapping[str, float | None] | None = None,
    init: Mapping[str, float] | None = None,
    taus: Sequence[float] = DEFAULT_TAUS,
    gains: Sequence[float] = DEFAULT_GAINS,
    margins: Sequence[float] = DEFAULT_MARGINS,
    max_increase: float = 0.05,
    spurious_bound: float = 0.5,
    batch_size: int = 32,
    n_neutral: int = 8,
    seed: int = 1,
    reuse_prefix: bool | None = None,
    prefix_store: Any = None,
    **operator: Any,
) -> MARS:
    """MARS for `mm` with its layer and gate fitted from text and safe data (module docstring).

    harmful_texts: harmful text prompts (list of str or a text PromptSet), e.g. held-out
    selection prompts. safe_sets: {name: PromptSet} of harmless text / harmless image requests /
    caption prompts (labelled harmless); neutral: {modality: PromptSet} of object-less inputs for
    layer selection (default: `n_neutral` generated with `seed`). gate: {"tau"|"gain"|"margin": value} parts
    to keep fixed (the rest is fitted on `taus` / `gains` / `margins`). operator: other MARS
    settings (recenter, trust_region, offset_mode, ...), kept through the fit. reuse_prefix: how
    both sweeps score a grid point (None: over the prompt's key/value cache when the model runs
    locally, `PrefixCache`; False: a full forward per point; same choice within float tolerance).
    With the cache, one `PrefixStore` holds every batch's cache for the whole fit, so the second
    layer pass (and a gate re-fit) prefill nothing again; it is dropped at the end unless given as
    prefix_store (then it is kept: its `nbytes`, and later fits on the same prompts reuse it).

    Returns the MARS operator with `.selection` (layer Dataset), `.gate_selection` (gate Dataset,
    None when every gate part was fixed) and `.fit_info` (chosen layer and gate, the layer with
    the initial gate, whether each selection fell back).
    """
    bad = [k for k in operator if k not in OPERATOR_KWARGS or k in ("tau", "gain", "margin")]
    if bad:
        raise InputError(f"unknown MARS settings {bad}; the gate goes in gate=..., other settings are "
                         f"{[k for k in OPERATOR_KWARGS if k not in ('tau', 'gain', 'margin')]}")
    harmful = _texts(harmful_texts)
    fixed = {k: (None if v is None else float(v)) for k, v in dict(gate or {}).items()}
    unknown = [k for k in fixed if k not in ("tau", "gain", "margin")]
    if unknown:
        raise InputError(f"gate parts {unknown}; use tau, gain and margin")
    fixed = {k: fixed.get(k) for k in ("tau", "gain", "margin")}
    start = {**INITIAL_GATE, **dict(init or {}), **{k: v for k, v in fixed.items() if v is not None}}
    grids = {"taus": list(taus) if fixed["tau"] is None else [fixed["tau"]],
             "gains": list(gains) if fixed["gain"] is None else [fixed["gain"]],
             "margins": list(margins) if fixed["margin"] is None else [fixed["margin"]]}
    all_fixed = all(v is not None for v in fixed.values())

    from ..remote import resolve
    from .sweep import PrefixStore

    if prefix_store is not None:
        prefix_store.check_model(mm, "fit_mars")
    use_cache = not resolve(mm) if reuse_prefix is None else bool(reuse_prefix)
    store = (prefix_store if prefix_store is not None else PrefixStore(mm)) if use_cache else None

    def choose_layer(g: Mapping[str, float]):
        return select_mars_layer(mm, calibration, harmful, neutral=neutral, layer=layer, layers=layers,
                                 spurious_bound=spurious_bound, batch_size=batch_size, n_neutral=n_neutral, seed=seed,
                                 mars_kwargs={**operator, **g}, reuse_prefix=reuse_prefix,
                                 prefix_store=store)

    def choose_gate(at: int):
        if all_fixed:
            return {k: fixed[k] for k in ("tau", "gain", "margin")}, None
        if not safe_sets:
            raise InputError("fitting the MARS gate needs safe prompt sets (harmless text, harmless image "
                             "requests, captions); give safe_sets, or fix the gate with gate={...}")
        g, ds = select_mars_gate(mm, calibration, at, safe_sets, max_increase=max_increase, batch_size=batch_size,
                                 mars_kwargs=operator, reuse_prefix=reuse_prefix, prefix_store=store,
                                 **grids)
        return g, ds

    layer0, layer_ds = choose_layer(start)
    g, gate_ds = choose_gate(layer0)
    chosen = layer0
    if not all_fixed and layer is None:
        chosen, layer_ds = choose_layer(g)
        if chosen != layer0:  # re-fit every free part at the new layer
            g, gate_ds = choose_gate(chosen)
    if store is not None and prefix_store is None:
        store.clear()
    op = MARS(calibration, chosen, **operator, **g)
    op.selection, op.gate_selection = layer_ds, gate_ds
    op.fit_info = {
        "layer": int(chosen), "gate": dict(g), "layer_with_initial_gate": int(layer0), "initial_gate": dict(start),
        "layer_given": layer is not None, "gate_fixed": {k: v for k, v in fixed.items() if v is not None},
        "layer_fallback": str(layer_ds.attrs.get("fallback", "")) if layer is None else "",
        "gate_fallback": bool(gate_ds.attrs.get("fallback", False)) if gate_ds is not None else False,
        "max_increase": float(max_increase), "spurious_bound": float(spurious_bound),
        "safe_sets": {n: ps.sha256 for n, ps in (safe_sets or {}).items()},
        "operator": dict(operator),
    }
    if layer_ds is not None:
        layer_ds.attrs.update({f"{k}_fitted_on_safe_data": v for k, v in g.items()})
        layer_ds.attrs["layer_with_initial_gate"] = int(layer0)
    if gate_ds is not None:
        gate_ds.attrs["layer_with_initial_gate"] = int(layer0)
    return op
