"""Choosing MARS's intervention layer from text-only data and neutral multimodal inputs.

Nothing harmful and multimodal is used: harmful TEXT prompts measure how much refusal MARS
induces at each layer, object-less neutral images/videos how much spurious refusal it adds.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from ..errors import InputError
from .baselines import NoSteer
from .calibration import MarsCalibration
from .mars import MARS
from .sweep import first_token_sweep


def select_mars_layer(
    mm: Any,
    calibration: MarsCalibration,
    harmful_texts: Sequence[str],
    *,
    neutral: Mapping[str, Any] | None = None,
    layers: Sequence[int] | None = None,
    layer: int | None = None,
    spurious_bound: float = 0.5,
    prune_layer_frac: float = 0.2,
    n_neutral: int = 8,
    seed: int = 1,
    refusal_ids: Sequence[int] | None = None,
    batch_size: int = 8,
    mars_kwargs: dict[str, Any] | None = None,
    reuse_prefix: bool | None = None,
    prefix_store: Any = None,
):
    """Choose MARS's intervention layer from text-only data and neutral multimodal inputs.

    For every candidate layer l (default: every calibrated layer; those at or above
    floor(n_layers * (1 - prune_layer_frac)) are evaluated but not eligible), MARS at l (with `mars_kwargs`; scored with `first_token_sweep`, so a
    batch costs one prefill plus one single-token forward per layer) is run on
      - the harmful text prompts: induced[l] = mean first-token refusal log-odds, and
      - neutral inputs of each calibrated modality m (default: fresh neutral images/videos drawn
        with `seed`, n_neutral each): spurious[m, l] = mean refusal log-odds, and
        spurious_delta[m, l] = spurious[m, l] - the unsteered mean on the same inputs.
    Feasible layers: pass_layer and max_m spurious_delta[m, l] <= spurious_bound. The chosen layer
    maximises induced among feasible layers (lowest layer on ties); if none is feasible the layer
    with the smallest max spurious_delta is chosen and attrs["fallback"] says so (with a warning).
    A given `layer` overrides: only it is evaluated and it is returned. reuse_prefix: passed to
    `first_token_sweep` (None: reuse the prompt cache when local; False: full forwards);
    prefix_store: a `PrefixStore` to keep the prompt caches in (fit_mars's second pass reuses them).

    Returns (layer, xarray.Dataset) with vars induced, induced_base, alpha_harmful, gate_harmful,
    score_harmful [layer]; spurious, spurious_base, spurious_delta, alpha_neutral, gate_neutral,
    score_neutral [modality, layer]; pass_layer, pass_spurious, feasible [layer]; attrs with the
    choice, the bound and provenance.
    """
    import xarray as xr

    from ..datasets import dataset_provenance, var
    from ..scoring import first_token_refusal_score, refusal_token_ids
    from .neutral import neutral_sets

    calibration.check_model(mm)
    mars_kwargs = dict(mars_kwargs or {})
    harmful_texts = list(harmful_texts)
    if not harmful_texts:
        raise InputError("select_mars_layer needs harmful text prompts")
    if refusal_ids is None:
        refusal_ids = refusal_token_ids(mm.tokenizer)
    cut = int(math.floor(mm.n_layers * (1.0 - prune_layer_frac)))
    if layer is not None:
        cand = [calibration.layers[calibration.index(layer)]]
    elif layers is not None:
        cand = [calibration.layers[calibration.index(l)] for l in layers]
    else:
        cand = list(calibration.layers)
    mods = list(calibration.modalities)
    if neutral is None:
        neutral = {m: neutral_sets(mm, [m], n_neutral, seed=seed)[1][m] for m in mods}
    for m, ps in neutral.items():
        if getattr(ps, "modality", None) != m:
            raise InputError(f"neutral[{m!r}] must be a PromptSet of {m} inputs (mars_core.steering.neutral_sets)")
    mods = [m for m in mods if m in neutral]

    def batches(texts, **media):
        from ..prompts import PromptSet

        return [mm.build_batch(t, **med) for t, med in PromptSet("prompts", texts, **media).batches(batch_size)]

    steerers = [NoSteer()] + [MARS(calibration, l, **mars_kwargs) for l in cand]

    def run(bs):
        """For [no steering] + MARS at each candidate: mean refusal log-odds, mean alpha, gate
        rate, mean s over the batches (one shared-prefix sweep per batch)."""
        n = len(steerers)
        scores, alphas, ss = [[] for _ in range(n)], [[] for _ in range(n)], [[] for _ in range(n)]
        for b in bs:
            logits, recs = first_token_sweep(mm, b, steerers, reuse_prefix=reuse_prefix, store=prefix_store)
            for j in range(n):
                scores[j].append(first_token_refusal_score(logits[j], refusal_ids))
                if "alpha" in recs[j]:
                    alphas[j].append(recs[j]["alpha"].to(torch.float64))
                    ss[j].append(recs[j]["score"].to(torch.float64))
        out = []
        for j in range(n):
            sc = torch.cat(scores[j])
            al = torch.cat(alphas[j]) if alphas[j] else torch.zeros_like(sc)
            s_ = torch.cat(ss[j]) if ss[j] else torch.full_like(sc, float("nan"))
            out.append((float(sc.mean()), float(al.mean()), float((al > 0).double().mean()), float(s_.mean())))
        return out

    harm_b = batches(harmful_texts)
    neu_b = {m: batches(neutral[m].texts, **neutral[m].media_kwargs()) for m in mods}
    L, M = len(cand), len(mods)
    res_h = run(harm_b)
    res_n = [run(neu_b[m]) for m in mods]
    induced_base = res_h[0][0]
    spurious_base = np.array([r[0][0] for r in res_n])
    induced, a_h, g_h, s_h = (np.array([r[k] for r in res_h[1:]]) for k in range(4))
    spur, a_n, g_n, s_n = (np.array([[r[k] for r in rn[1:]] for rn in res_n]).reshape(M, L) for k in range(4))
    spur_delta = spur - spurious_base[:, None]
    worst = spur_delta.max(0) if M else np.zeros(L)
    pass_layer = np.array([l < cut for l in cand]) if layer is None else np.ones(L, bool)
    pass_spur = worst <= spurious_bound
    feasible = pass_layer & pass_spur
    fallback = ""
    if layer is not None:
        chosen = cand[0]
        fallback = "layer given by the caller"
    elif feasible.any():
        chosen = cand[int(np.argmax(np.where(feasible, induced, -np.inf)))]
    else:
        pool = pass_layer if pass_layer.any() else np.ones(L, bool)
        chosen = cand[int(np.argmin(np.where(pool, worst, np.inf)))]
        fallback = (f"no layer kept neutral spurious refusal within +{spurious_bound}; chose the layer with "
                    "the smallest spurious increase")
        warnings.warn(f"select_mars_layer: {fallback} (layer {chosen})", stacklevel=2)

    lo = "log-odds"
    ml = ("modality", "layer")
    ds = xr.Dataset(
        {
            "induced": var(("layer",), induced, "mean first-token refusal score of harmful text under MARS", lo),
            "alpha_harmful": var(("layer",), a_h, "mean MARS strength on harmful text", "residual units"),
            "gate_harmful": var(("layer",), g_h, "share of harmful text prompts the gate opens for", "fraction"),
            "score_harmful": var(("layer",), s_h, "mean normalised projection s of harmful text",
                                 "0 = harmless text centroid, 1 = harmful text centroid"),
            "spurious": var(ml, spur, "mean first-token refusal score of neutral inputs under MARS", lo),
            "spurious_delta": var(ml, spur_delta, "spurious minus the unsteered score on the same inputs", lo),
            "alpha_neutral": var(ml, a_n, "mean MARS strength on neutral inputs", "residual units"),
            "gate_neutral": var(ml, g_n, "share of neutral inputs the gate opens for", "fraction"),
            "score_neutral": var(ml, s_n, "mean normalised projection s of neutral inputs (re-centred)",
                                 "0 = harmless text centroid, 1 = harmful text centroid"),
            "spurious_base": var(("modality",), spurious_base, "unsteered mean refusal score of neutral inputs", lo),
            "induced_base": var((), induced_base, "unsteered mean refusal score of harmful text", lo),
            "pass_layer": (("layer",), pass_layer, {"long_name": f"layer below the pruning cut ({cut})"}),
            "pass_spurious": (("layer",), pass_spur, {"long_name": f"max spurious_delta <= {spurious_bound}"}),
            "feasible": (("layer",), feasible, {"long_name": "eligible layer (pass_layer and pass_spurious)"}),
        },
        coords={"layer": cand, "modality": mods},
        attrs=dataset_provenance(
            "mars_layer_selection", mm, {"harmful_text": harmful_texts, **{f"neutral_{m}": neutral[m] for m in mods}},
            seed=seed,
            selected_layer=int(chosen),
            fallback=fallback,
            spurious_bound=float(spurious_bound),
            layer_cut=cut,
            prune_layer_frac=float(prune_layer_frac),
            mars_kwargs=dict(mars_kwargs),
            calibration_fingerprint=calibration.fingerprint,
        ),
    )
    ds["layer"].attrs.update({"long_name": "decoder layer", "units": "index"})
    return int(chosen), ds
