"""Spurious refusal of safe multimodal inputs under MARS, with and without re-centering.

At one layer l, with the calibration's unit text direction r, p_harm, p_safe, gap
Delta = p_harm - p_safe and modality offset o_m, each safe input x (last prompt position) has

    s = (x_c . r - p_safe) / Delta,   x_c = x - o_m if recenter else x

(`projection`; 0 at the harmless text centroid, 1 at the harmful one). MARS's adaptive gate
opens where s > tau (`gate_open`). The safe inputs are steered by adaptive MARS with
gain = strength in gap units (gain_units="gap"), i.e. the strength added along r is

    alpha = min(strength * Delta * max(0, s - tau), cap)

so `strength` = 1 adds one full text mean difference to an input one gap above the gate (cap:
the trust region, if on). Without re-centering the modality offset pushes safe images and
videos toward the harmful side, opens the gate and makes them refuse as the strength grows;
with re-centering the gate stays shut. At strength 0 nothing is added, for either setting.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import xarray as xr

from mars_core.errors import InputError
from mars_core.prompts import PromptSet

from ._common import (
    dataset_provenance,
    attach_coord_attrs,
    build_batches,
    check_judge,
    check_model_takes,
    check_modality,
    check_prompt_set,
    judge_generations,
    order_modalities,
    resolve_refusal_ids,
    score_batches,
    var,
)

__all__ = ["spurious_refusal"]

_FIXED = ("recenter", "adaptive", "gain", "gain_units")


def spurious_refusal(
    mm: Any,
    calibration: Any,
    safe: Mapping[str, PromptSet],
    *,
    layer: int,
    strengths: Sequence[float],
    generate: bool = True,
    judge: Any = None,
    max_new_tokens: int = 8,
    batch_size: int = 8,
    refusal_ids: Sequence[int] | None = None,
    mars_kwargs: Mapping[str, Any] | None = None,
    seed: int | None = None,
) -> xr.Dataset:
    """Refusal of safe inputs vs MARS strength, with and without re-centering (module docstring).

    mm: MarsModel. calibration: `MarsCalibration` with offsets for every non-text modality of
    `safe`. safe: {modality: PromptSet} of benign requests ("image", "video"; "text" is allowed
    as a reference, where re-centering changes nothing). layer: MARS's intervention layer.
    strengths: gains >= 0 in gap units. generate: also judge greedy generations of
    `max_new_tokens` tokens (default judge `SubstringJudge()`); else `refused` is NaN.
    mars_kwargs: other MARS settings (tau, margin, trust_region, offset_mode, scope); recenter,
    adaptive, gain and gain_units are set here.

    Returns the Dataset of docs/datasets.md "spurious refusal": dims recenter (False, True),
    strength, modality, prompt (0..max set size - 1; NaN beyond a set's size); vars refused,
    score [recenter, strength, modality, prompt], projection, gate_open [recenter, modality,
    prompt]; attrs p_harm, p_safe, layer (plus tau and the MARS settings).
    """
    safe = dict(safe or {})
    if not safe:
        raise InputError("safe is empty; give {modality: PromptSet} of benign image/video requests")
    if calibration is None:
        raise InputError("spurious_refusal needs a MarsCalibration")
    for m, ps in safe.items():
        check_modality(m, f"safe[{m!r}]")
        check_prompt_set(ps, f"safe[{m!r}]", m)
        check_model_takes(mm, m, f"safe[{m!r}]")
        if m != "text" and m not in calibration.modalities:
            raise InputError(
                f"safe[{m!r}]: the calibration has no {m} offset (it has {list(calibration.modalities)}); "
                "calibrate that modality with calibrate_mars"
            )
    calibration.check_model(mm)
    mars_kwargs = dict(mars_kwargs or {})
    bad = [k for k in _FIXED if k in mars_kwargs]
    if bad:
        raise InputError(f"mars_kwargs may not set {bad}: spurious_refusal sets them (strength is the gain)")
    at = calibration.at(layer)
    layer = calibration.layers[calibration.index(layer)]
    st = np.asarray([float(s) for s in np.atleast_1d(strengths)], dtype=np.float64)
    if st.size == 0:
        raise InputError("strengths is empty; give at least one strength")
    if not np.isfinite(st).all() or (st < 0).any() or len(set(st.tolist())) != st.size:
        raise InputError(f"strengths must be finite, >= 0 and distinct, got {st.tolist()}")
    if generate:
        judge = check_judge(judge)
    rid = resolve_refusal_ids(mm, refusal_ids)

    from mars_core.steering import MARS

    mods = order_modalities(safe)
    n_max = max(len(ps) for ps in safe.values())
    rec_vals = (False, True)
    refused = np.full((2, st.size, len(mods), n_max), np.nan)
    score = np.full_like(refused, np.nan)
    proj = np.full((2, len(mods), n_max), np.nan)
    gate = np.full_like(proj, np.nan)
    tau = float(mars_kwargs.get("tau", 0.5))
    for im, m in enumerate(mods):
        ps = safe[m]
        n = len(ps)
        batches = build_batches(mm, ps, batch_size)
        for ir, rc in enumerate(rec_vals):
            for js, s in enumerate(st):
                steerer = MARS(calibration, layer, **mars_kwargs, recenter=rc, adaptive=True, gain=float(s),
                               gain_units="gap")
                tau = steerer.tau
                sc, rec = score_batches(mm, steerer, batches, rid)
                score[ir, js, im, :n] = sc
                if js == 0:  # s is read before the edit: it does not depend on the strength
                    proj[ir, im, :n] = rec["score"]
                    gate[ir, im, :n] = (rec["score"] > tau).astype(np.float64)
                if not generate:
                    continue
                if s == 0.0 and ir == 1:  # gain 0 adds nothing: the same generations as recenter=False
                    refused[ir, js, im, :n] = refused[0, js, im, :n]
                else:
                    refused[ir, js, im, :n] = judge_generations(mm, steerer, ps, judge, batch_size=batch_size,
                                                                max_new_tokens=max_new_tokens)

    d4 = ("recenter", "strength", "modality", "prompt")
    d3 = ("recenter", "modality", "prompt")
    ds = xr.Dataset(
        {
            "refused": var(d4, refused, "judged refusal of safe inputs", "1"),
            "score": var(d4, score, "first-token refusal score", "log-odds"),
            "projection": var(d3, proj, "normalised projection s on refusal direction",
                              "0 = harmless text centroid, 1 = harmful text centroid"),
            "gate_open": var(d3, gate, "adaptive gate opened", "1"),
        },
        coords={"recenter": list(rec_vals), "strength": st, "modality": mods, "prompt": np.arange(n_max)},
        attrs={
            **dataset_provenance(
                "spurious", mm, {f"safe_{m}": ps for m, ps in safe.items()}, seed=seed,
                generate=bool(generate), max_new_tokens=int(max_new_tokens) if generate else 0,
                judge=getattr(judge, "name", type(judge).__name__) if generate else "",
                mars_kwargs=dict(mars_kwargs),
                strength_definition="MARS gain in gap units: alpha = min(strength * (p_harm - p_safe) * "
                                    "relu(s - tau), cap)",
                refusal_ids=rid,
            ),
            "p_harm": float(at["p_harm"]),
            "p_safe": float(at["p_safe"]),
            "layer": int(layer),
            "tau": float(tau),
        },
    )
    attach_coord_attrs(ds)
    ds["strength"].attrs.update(long_name="MARS gain", units="× text gap per unit of s above τ")
    return ds
