"""Per-layer alignment of the text refusal direction with image / video requests.

For every layer l and modality m (image, video), at the last prompt position (pos = -1), with
the text mean difference d_l = mu_harm,text - mu_safe,text (from `RefusalDirections`) and its
unit vector r_l = d_l / ||d_l||:

    d_m          = mean(harmful m requests) - mean(harmless m requests)
    o_m          = mean(neutral m inputs) - mean(neutral text inputs)         (modality offset)
    cos_direction           = cos(d_l, d_m)
    cos_offset              = cos(o_m, d_l)
    offset_norm_ratio       = ||o_m|| / ||d_l||
    offset_projection_ratio = (o_m . r_l) / (p_harm - p_safe),  p_harm - p_safe = d_l . r_l = ||d_l||
    auc                     = P(x_harm . r_l > x_safe . r_l) + 1/2 P(=)   over harmful x harmless
                              m requests (Mann-Whitney U / (n_harm n_safe))

Activations are read with `mars_core.capture.collect_activations` (one nnsight trace per
batch, the forward stopped after the last requested layer) in chunks of prompts, so memory
holds one chunk of activations plus float64 running sums and one projection per prompt and
layer.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import xarray as xr

from mars_core.directions import RefusalDirections, model_shape
from mars_core.errors import IncompatibleModelError, InputError
from mars_core.prompts import PromptSet
from mars_core.stats import auc

from ._common import (
    dataset_provenance,
    attach_coord_attrs,
    check_layers,
    check_model_takes,
    check_modality,
    check_prompt_set,
    order_modalities,
    var,
)

__all__ = ["layer_alignment", "stream_last_position"]


def stream_last_position(mm: Any, ps: PromptSet, layers: Sequence[int], r_unit: np.ndarray | None = None, *,
                         batch_size: int = 8, chunk: int | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Mean activation [L, D] (float64) at the last prompt position of `layers`, and, if `r_unit`
    [L, D] is given, every prompt's projection x . r_l [n, L] (float64).

    Reads `chunk` prompts at a time (default 16 batches) through `collect_activations`.
    """
    from mars_core.capture import collect_activations

    chunk = int(chunk or 16 * batch_size)
    total = np.zeros((len(layers), mm.d_model), dtype=np.float64)
    projs = []
    for s in range(0, len(ps), chunk):
        sub = ps.subset(slice(s, s + chunk))
        ds = collect_activations(mm, sub.texts, images=sub.images, videos=sub.videos, layers=list(layers),
                                 positions="last", reduce="none", batch_size=batch_size, progress=False)
        got = [int(x) for x in ds["layer"].values]
        if got != list(layers):
            raise InputError(f"collect_activations returned layers {got}, expected {list(layers)}")
        acts = ds["acts"].sel(pos=-1).transpose("prompt", "layer", "d_model").values.astype(np.float64)
        total += acts.sum(0)
        if r_unit is not None:
            projs.append(np.einsum("nld,ld->nl", acts, r_unit))
    mean = total / len(ps)
    return mean, (np.concatenate(projs, 0) if r_unit is not None else None)


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine of [L, D] arrays (NaN where a norm is 0)."""
    na, nb = np.linalg.norm(a, axis=-1), np.linalg.norm(b, axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.einsum("ld,ld->l", a, b) / (na * nb)


def layer_alignment(
    mm: Any,
    directions: RefusalDirections,
    harmful: Mapping[str, PromptSet],
    harmless: Mapping[str, PromptSet],
    neutral: Mapping[str, PromptSet],
    *,
    layers: Sequence[int] | None = None,
    batch_size: int = 8,
    seed: int | None = None,
) -> xr.Dataset:
    """Alignment of each layer's text refusal direction with image / video data (module docstring).

    mm: MarsModel. directions: text `RefusalDirections` of this model, with position -1.
    harmful, harmless: {modality: PromptSet} of image / video requests ("image", "video"; both
        dicts must have the same keys; the text direction comes from `directions`, so "text" is
        not accepted here). May be empty when only offsets are wanted.
    neutral: {modality: PromptSet} of benign inputs; must hold "text" (the reference of every
        offset) and gives offsets for the other keys. The neutral m set should pair the same
        requests with media that the "text" set has without media.
    layers: subset of the directions' layers (default all). seed: recorded in provenance.

    Returns the Dataset of docs/datasets.md "alignment": dims `layer`, `modality` (image / video,
    those present in any dict); vars cos_direction, cos_offset, offset_norm_ratio,
    offset_projection_ratio, auc [layer, modality]; NaN where a modality lacks the data
    (e.g. a neutral set but no harmful/harmless requests). Raises InputError for a missing
    "text" neutral set, mismatched or empty dicts, prompt sets of the wrong modality, or media
    the model cannot take; IncompatibleModelError if the directions are for another shape.
    """
    if not isinstance(directions, RefusalDirections):
        raise InputError(f"directions must be a RefusalDirections, got {type(directions).__name__}")
    if model_shape(mm) != (int(directions.n_layers), int(directions.d_model)):
        raise IncompatibleModelError(
            f"the directions are for {directions.n_layers} layers / d_model={directions.d_model}; the model has "
            f"{mm.n_layers} / {mm.d_model}"
        )
    if -1 not in directions.positions:
        raise InputError(f"the directions hold positions {list(directions.positions)}; alignment needs pos=-1")
    harmful, harmless, neutral = dict(harmful or {}), dict(harmless or {}), dict(neutral or {})
    if "text" not in neutral:
        raise InputError(
            "neutral must include a 'text' PromptSet: every modality offset is measured against the neutral "
            "text mean (use the same benign requests without media)"
        )
    for name, d in (("harmful", harmful), ("harmless", harmless)):
        if "text" in d:
            raise InputError(
                f"{name}['text'] given: the text refusal direction comes from `directions`; pass only "
                "'image' / 'video' request sets here"
            )
    if set(harmful) != set(harmless):
        raise InputError(
            f"harmful has modalities {sorted(harmful)} but harmless has {sorted(harmless)}; give both sides of "
            "every modality"
        )
    sets: dict[str, PromptSet] = {}
    for name, d in (("harmful", harmful), ("harmless", harmless), ("neutral", neutral)):
        for m, ps in d.items():
            check_modality(m, name)
            check_prompt_set(ps, f"{name}[{m!r}]", m)
            check_model_takes(mm, m, f"{name}[{m!r}]")
            sets[f"{name}_{m}"] = ps
    mods = order_modalities([m for m in (*harmful, *neutral) if m != "text"])
    if not mods:
        raise InputError(
            "no image or video data: give harmful/harmless request sets and/or neutral sets for 'image' or "
            "'video' (besides neutral['text'])"
        )
    if layers is None:
        lay = list(directions.layers)
    else:
        lay = sorted(check_layers(mm, layers))
        missing = [l for l in lay if l not in directions.layers]
        if missing:
            raise InputError(f"layers {missing} were not extracted; the directions hold {list(directions.layers)}")
    if not lay:
        raise InputError("no layers to analyse")

    d_text = np.stack([directions.direction(l, -1, unit=False).numpy() for l in lay])  # [L, D]
    gap = np.linalg.norm(d_text, axis=-1)  # = p_harm - p_safe along r
    with np.errstate(invalid="ignore", divide="ignore"):
        r_unit = d_text / gap[:, None]
    r_unit = np.nan_to_num(r_unit)

    L, M = len(lay), len(mods)
    out = {k: np.full((L, M), np.nan) for k in
           ("cos_direction", "cos_offset", "offset_norm_ratio", "offset_projection_ratio", "auc")}
    neutral_text_mean = None
    if any(m in neutral for m in mods):
        neutral_text_mean, _ = stream_last_position(mm, neutral["text"], lay, batch_size=batch_size)
    for j, m in enumerate(mods):
        if m in harmful:
            mh, ph = stream_last_position(mm, harmful[m], lay, r_unit, batch_size=batch_size)
            ms, pn = stream_last_position(mm, harmless[m], lay, r_unit, batch_size=batch_size)
            out["cos_direction"][:, j] = _cos(d_text, mh - ms)
            out["auc"][:, j] = auc(ph.T, pn.T)  # [L, n] each (Mann-Whitney, mars_core.stats)
        if m in neutral:
            mn, _ = stream_last_position(mm, neutral[m], lay, batch_size=batch_size)
            off = mn - neutral_text_mean
            out["cos_offset"][:, j] = _cos(off, d_text)
            with np.errstate(invalid="ignore", divide="ignore"):
                out["offset_norm_ratio"][:, j] = np.linalg.norm(off, axis=-1) / gap
                out["offset_projection_ratio"][:, j] = np.einsum("ld,ld->l", off, r_unit) / gap

    d = ("layer", "modality")
    ds = xr.Dataset(
        {
            "cos_direction": var(d, out["cos_direction"], "cosine(text direction, modality direction)", "cosine"),
            "cos_offset": var(d, out["cos_offset"], "cosine(modality offset, text direction)", "cosine"),
            "offset_norm_ratio": var(d, out["offset_norm_ratio"], "||offset|| / ||text mean difference||", "ratio"),
            "offset_projection_ratio": var(d, out["offset_projection_ratio"],
                                           "offset projection / text harmful-harmless gap", "ratio"),
            "auc": var(d, out["auc"], "harmful-vs-harmless AUC along text direction", "AUC"),
        },
        coords={"layer": np.asarray(lay, dtype=np.int64), "modality": list(mods)},
        attrs=dataset_provenance(
            "alignment", mm, sets, seed=seed, pos=-1,
            directions_model_config_hash=directions.provenance.get("model_config_hash", ""),
            directions_harmful_sha256=directions.provenance.get("harmful_sha256", ""),
            directions_harmless_sha256=directions.provenance.get("harmless_sha256", ""),
        ),
    )
    return attach_coord_attrs(ds)
