"""Choosing the refusal direction's (layer, position) for text, after Arditi et al. (2024).

For every candidate (l, p) in the extracted `RefusalDirections` (unit vector r = unit[l, p],
raw difference v = mean_diff[l, p]) and held-out validation prompts:

  bypass_score[l, p]  mean first-token refusal log-odds over held-out HARMFUL prompts while r is
                      ablated everywhere: x <- x - (x . r) r applied to the output of every decoder
                      layer at every position (and to the input of layer 0, i.e. the embeddings,
                      unless include_embeddings=False). Lower = the direction mediates refusal.
  induce_score[l, p]  mean refusal log-odds over held-out HARMLESS prompts while v (times
                      `induce_coeff`) is added to the output of layer l only, at every position
                      (induce_positions="all", the default, as in Arditi et al.) or only at the
                      last prompt column (induce_positions="last"). Higher = adding it induces refusal.
  kl[l, p]            mean over held-out HARMLESS prompts of KL(P_base || P_ablated) of the
                      next-token distribution at the last prompt column, with the same ablation as
                      bypass_score. Small = ablation leaves harmless behaviour intact.

Filters (each a boolean variable in the result): pass_layer: l < floor(n_layers * (1 -
prune_layer_frac)) (skip the last 20% of layers by default); pass_kl: kl < kl_threshold (0.1);
pass_induce: induce_score > induce_threshold (0). The chosen candidate is the one with the lowest
bypass_score among those passing all filters (first in (layer, pos) order on ties). If none
passes, the lowest bypass_score among pass_layer candidates is chosen, attrs["fallback"] says so
and a warning is raised.

scores="all" (the default, as in Arditi et al.) scores every candidate: C x (n_harmful + 2 x
n_harmless) prompt forwards for C candidates, and the Dataset holds the full score maps.
scores="needed" computes only what the choice depends on, and chooses the same candidate: the
bypass score of every candidate at a layer < the cut (every candidate if none is), then, in
ascending bypass order (ties in (layer, pos) order), its KL and, only if the KL filter passes, its
induce score, stopping at the first candidate that passes both. The KL runs batch by batch and
stops once the prompts scored so far prove the filter fails (per-prompt KL >= 0, so their sum /
n_harmless bounds the mean from below; `bounded_kl`, `kl_lower_bound`): in the fallback every
candidate below the cut has had its KL scored or bounded. Unscored entries are NaN;
`scored_bypass`, `scored_kl`, `scored_induce` say which were computed in full; attrs["n_forwards"]
counts the batches run either way.

share_head=True runs each batch's shared chat-template head once per edit (batch 1) and the rows'
rest over its key/value cache (`mars_core.headshare`): every forward of the selection gets
cheaper by about the head's share of the tokens, with results equal to full forwards within
float tolerance (checked once per call on the first harmless batch).

All edits are nnsight edits inside one trace per batch (`mars_core.steering.baselines.ablate_direction`,
`add_vector`).
"""

from __future__ import annotations

import warnings
from typing import Any, Literal, Sequence

import numpy as np
import torch

from .errors import InputError
from .headshare import HEAD_RTOL
from .provenance import make_provenance, sha256_text
from .scoring import kl_divergence, last_logits, first_token_refusal_score, refusal_token_ids
from .steering.baselines import ablate_direction, add_vector


KL_SLACK = 1e-9
"""Least per-prompt KL assumed for unscored prompts in a lazy KL bound (KL >= 0 up to rounding)."""
KL_MARGIN = 1e-9
"""A lazy KL bound must clear the threshold by this much before the remaining prompts are skipped."""

# ---------------------------------------------------------------------- selection
def _batches(mm: Any, prompts: list[str], batch_size: int) -> list[Any]:
    return [mm.build_batch(prompts[i : i + batch_size]) for i in range(0, len(prompts), batch_size)]


def layer_cut(n_layers: int, prune_layer_frac: float) -> int:
    """Candidates at layers below this pass the layer filter: floor(n_layers * (1 - prune_layer_frac))."""
    return int(np.floor(int(n_layers) * (1.0 - prune_layer_frac)))


def choose_candidate(
    bypass: np.ndarray,
    induce: np.ndarray,
    kl: np.ndarray,
    layers: Sequence[int],
    n_layers: int,
    prune_layer_frac: float = 0.2,
    kl_threshold: float = 0.1,
    induce_threshold: float = 0.0,
) -> dict[str, Any]:
    """Apply the filters to score arrays [n_cand_layers, n_pos] and pick the lowest bypass score.

    Returns {"pass_layer", "pass_kl", "pass_induce", "passes" (bool arrays of the same shape),
    "index" (i, j) of the choice, "fallback" (str, "" if a candidate passed every filter)}.
    """
    bypass, induce, kl = (np.asarray(a, dtype=np.float64) for a in (bypass, induce, kl))
    cut = layer_cut(n_layers, prune_layer_frac)
    lay = np.asarray(layers)[:, None]
    pass_layer = np.broadcast_to(lay < cut, bypass.shape).copy()
    pass_kl = np.nan_to_num(kl, nan=np.inf) < kl_threshold
    pass_induce = np.nan_to_num(induce, nan=-np.inf) > induce_threshold
    passes = pass_layer & pass_kl & pass_induce
    fallback = ""
    pool = passes
    if not passes.any():
        fallback = "no candidate passed every filter; chose the lowest bypass score among layers < %d" % cut
        pool = pass_layer
        if not pool.any():
            fallback = "no candidate passed any filter; chose the lowest bypass score overall"
            pool = np.ones_like(passes)
    masked = np.where(pool, np.nan_to_num(bypass, nan=np.inf), np.inf)
    i, j = np.unravel_index(int(np.argmin(masked)), masked.shape)
    return {
        "pass_layer": pass_layer,
        "pass_kl": pass_kl,
        "pass_induce": pass_induce,
        "passes": passes,
        "index": (int(i), int(j)),
        "fallback": fallback,
        "layer_cut": cut,
    }


def select_direction(
    mm: Any,
    directions: Any,
    harmful_val: Sequence[str],
    harmless_val: Sequence[str],
    *,
    layers: Sequence[int] | None = None,
    positions: Sequence[int] | None = None,
    refusal_ids: Sequence[int] | None = None,
    prune_layer_frac: float = 0.2,
    kl_threshold: float = 0.1,
    induce_threshold: float = 0.0,
    induce_positions: Literal["all", "last"] = "all",
    induce_coeff: float = 1.0,
    include_embeddings: bool = True,
    batch_size: int = 8,
    scores: Literal["all", "needed"] = "all",
    share_head: bool = False,
):
    """Score every candidate (layer, pos) and choose one (see module docstring).

    mm: MarsModel; directions: RefusalDirections of that model; harmful_val / harmless_val:
    held-out text instructions (not those used for extraction). layers / positions restrict the
    candidates (default: all extracted). refusal_ids default to `refusal_token_ids(mm.tokenizer)`.
    share_head: run the tokens every prompt of a batch starts with (the chat template's head)
    once per batch and edit, and each row's rest over its key/value cache (`mars_core.headshare`;
    the head gets the part of the edit a full forward applies there). Equal to full forwards
    within float tolerance, checked on the first harmless batch (a failed check warns and falls
    back to full forwards); models headshare does not support run full forwards.

    Returns an xarray.Dataset with dims (layer, pos) [and harmful / harmless prompt dims]:
      bypass_score, induce_score, kl, direction_norm   float64 [layer, pos]
      bypass_prompt [layer, pos, harmful]; induce_prompt, kl_prompt [layer, pos, harmless]
      pass_layer, pass_kl, pass_induce, passes          bool [layer, pos]
      scored_bypass, scored_kl, scored_induce           bool [layer, pos] (all True for scores="all")
      baseline_harmful [harmful], baseline_harmless [harmless]  refusal log-odds without edits
    attrs: chosen_layer, chosen_pos, n_passing, fallback, the settings, the directions'
    provenance (prefixed "directions_"), validation-set hashes and sizes.
    """
    import xarray as xr

    from .directions import _check_prompts

    harmful_val = _check_prompts(harmful_val, "harmful validation")
    harmless_val = _check_prompts(harmless_val, "harmless validation")
    if int(directions.d_model) != int(mm.d_model) or int(directions.n_layers) != int(mm.n_layers):
        from .errors import IncompatibleModelError

        raise IncompatibleModelError(
            f"Directions are for {directions.n_layers} layers x d_model {directions.d_model}; the model has "
            f"{mm.n_layers} x {mm.d_model}."
        )
    want, have = directions.provenance.get("model_config_hash"), getattr(mm, "config_hash", None)
    if want and have and want != have:
        warnings.warn(
            f"The directions come from a model with config hash {want}; this one has {have}.", stacklevel=2
        )
    cand_layers = list(directions.layers) if layers is None else [int(l) % mm.n_layers for l in layers]
    cand_pos = list(directions.positions) if positions is None else [int(p) for p in positions]
    if not cand_layers or not cand_pos:
        raise InputError("No candidate layers/positions to score.")
    if refusal_ids is None:
        refusal_ids = refusal_token_ids(mm.tokenizer)
    refusal_ids = list(refusal_ids)

    if scores not in ("all", "needed"):
        raise InputError(f"scores must be 'all' or 'needed', got {scores!r}")
    from . import headshare

    hb = _batches(mm, harmful_val, batch_size)
    sb = _batches(mm, harmless_val, batch_size)
    n_fwd, n_head = [0], [0]
    share = bool(share_head) and headshare.supports(mm)
    pad = mm.tokenizer.pad_token_id if mm.tokenizer.pad_token_id is not None else 0

    heads: dict = {}  # head tag -> {head tokens: the head's batch-1 cache}; the baseline and one edit kept

    def forward(b, edit=None, head_edit=None, tag=None, shared=None) -> torch.Tensor:
        """Last-column logits of batch b: full, or over its shared head, edited by head_edit.
        tag names head_edit (None: unedited): batches with the same tag and head tokens reuse one
        head prefill; a new tag drops the previous edit's heads."""
        split = headshare.split_head(b.inputs, 1, pad) if (share if shared is None else shared) else None
        n_fwd[0] += 1
        if split is None:
            return last_logits(mm, b, edit)
        if tag not in heads:
            for k in [k for k in heads if k is not None]:
                del heads[k]
            heads[tag] = {}
        toks = tuple(split.head[0].tolist())
        if toks not in heads[tag]:
            n_head[0] += 1
            if (head_edit is None) != (tag is None):
                raise ValueError("select_direction: a head edit needs its tag and a tag its edit")  # a bug here
            heads[tag][toks] = headshare.head_prefill(mm, split, head_edit)
        cache = headshare.head_cache(mm, split, prefilled=heads[tag][toks])
        return last_logits(mm, b, edit, inputs=headshare.tail_inputs(split, cache))

    def run(batches: list[Any], edit=None, head_edit=None, tag=None) -> tuple[np.ndarray, torch.Tensor]:
        logits = torch.cat([forward(b, edit, head_edit, tag) for b in batches])
        return first_token_refusal_score(logits, refusal_ids).numpy(), logits

    head_err = None
    if share:  # the shared head must match a full forward before anything is scored with it
        got, ref = forward(sb[0]), forward(sb[0], shared=False)
        head_err = float((got - ref).abs().max() / ref.abs().max().clamp(min=1e-12))
        if n_head[0] == 0:
            share = False  # nothing to share in these batches
        elif head_err > HEAD_RTOL:
            share = False
            warnings.warn(
                f"Direction selection: the shared-head forward differs from a full forward by {head_err:.3g} of "
                f"the largest logit on {getattr(mm, 'model_id', 'this model')}; scoring with full forwards "
                "(share_head=False skips the check)",
                stacklevel=2,
            )

    base_h, _ = run(hb)
    base_s, base_s_logits = run(sb)
    s_rows = np.cumsum([0] + [int(b.inputs["input_ids"].shape[0]) for b in sb])

    L, P = len(cand_layers), len(cand_pos)
    nan = np.nan if scores == "needed" else 0.0
    bypass_p = np.full((L, P, len(harmful_val)), nan)
    induce_p = np.full((L, P, len(harmless_val)), nan)
    kl_p = np.full((L, P, len(harmless_val)), nan)
    kl_bound = np.full((L, P), np.nan)
    scored_b, scored_k, scored_i, bounded_k = (np.zeros((L, P), bool) for _ in range(4))
    norms = np.array([[float(directions.direction(l, p, unit=False).norm()) for p in cand_pos] for l in cand_layers])
    n_s = len(harmless_val)

    def abl_edit(i, j):
        r = directions.direction(cand_layers[i], cand_pos[j], unit=True)
        return lambda m: ablate_direction(m.layers, r, include_embeddings=include_embeddings)

    def score_bypass(i, j):
        scored_b[i, j] = True
        if norms[i, j] == 0:
            bypass_p[i, j] = base_h
        else:
            edit = abl_edit(i, j)
            bypass_p[i, j] = run(hb, edit, edit, ("ablate", i, j))[0]

    def score_kl(i, j, lazy: bool) -> None:
        """KL under the ablation, batch by batch; when lazy, stop as soon as the prompts scored
        so far prove the mean fails the filter (each KL >= 0, so their sum / n_harmless is a
        lower bound on the mean)."""
        edit = abl_edit(i, j)
        for bi, b in enumerate(sb):
            lo, hi = s_rows[bi], s_rows[bi + 1]
            kl_p[i, j, lo:hi] = kl_divergence(base_s_logits[lo:hi], forward(b, edit, edit, ("ablate", i, j))).numpy()
            if lazy and hi < n_s:
                bound = (float(kl_p[i, j, :hi].sum()) - (n_s - hi) * KL_SLACK) / n_s
                if bound >= kl_threshold + KL_MARGIN:
                    bounded_k[i, j], kl_bound[i, j] = True, bound
                    return
        scored_k[i, j] = True

    def score_filters(i, j, lazy=False):
        """KL, then the induce score (skipped when lazy and the KL filter already failed)."""
        if norms[i, j] == 0:
            scored_k[i, j] = scored_i[i, j] = True
            induce_p[i, j], kl_p[i, j] = base_s, 0.0
            return
        score_kl(i, j, lazy)
        if lazy and not (scored_k[i, j] and kl_p.mean(-1)[i, j] < kl_threshold):
            return
        scored_i[i, j] = True
        l, v = cand_layers[i], directions.direction(cand_layers[i], cand_pos[j], unit=False)
        edit = lambda m: add_vector(m.layers, v, l, positions=induce_positions, coeff=induce_coeff)  # noqa: E731
        if induce_positions == "all":
            induce_p[i, j] = run(sb, edit, edit, ("add", i, j))[0]
        else:  # a last-column edit leaves the head as the baseline ran it
            induce_p[i, j] = run(sb, edit)[0]

    cells = [(i, j) for i in range(L) for j in range(P)]
    if scores == "all":
        for i, j in cells:
            score_bypass(i, j)
            score_filters(i, j)
    else:
        cut = layer_cut(mm.n_layers, prune_layer_frac)
        first = [c for c in cells if cand_layers[c[0]] < cut] or cells
        for c in first:
            score_bypass(*c)
        b_mean = bypass_p.mean(-1)  # the same reductions choose_candidate sees
        for i, j in sorted(first, key=lambda c: (b_mean[c], c)):
            score_filters(i, j, lazy=True)
            if scored_k[i, j] and kl_p.mean(-1)[i, j] < kl_threshold and induce_p.mean(-1)[i, j] > induce_threshold:
                break

    bypass, induce, kl = bypass_p.mean(-1), induce_p.mean(-1), kl_p.mean(-1)
    ch = choose_candidate(bypass, induce, kl, cand_layers, int(mm.n_layers), prune_layer_frac, kl_threshold, induce_threshold)
    ci, cj = ch["index"]
    if ch["fallback"]:
        warnings.warn(f"Direction selection: {ch['fallback']}.", stacklevel=2)

    lp = ("layer", "pos")
    dprov = dict(directions.provenance)
    model_prov = dict(mm.provenance()) if hasattr(mm, "provenance") else {}
    prov = make_provenance(
        analysis="direction_selection",
        **model_prov,
        seed=dprov.get("seed", ""),
        chosen_layer=int(cand_layers[ci]),
        chosen_pos=int(cand_pos[cj]),
        n_passing=int(ch["passes"].sum()),
        fallback=ch["fallback"],
        layer_cut=ch["layer_cut"],
        prune_layer_frac=float(prune_layer_frac),
        kl_threshold=float(kl_threshold),
        induce_threshold=float(induce_threshold),
        induce_positions=induce_positions,
        induce_coeff=float(induce_coeff),
        include_embeddings=int(include_embeddings),
        scores=scores,
        n_forwards=int(n_fwd[0]),
        share_head=int(bool(share_head)),
        n_head_prefills=int(n_head[0]),
        head_check_rel_err=-1.0 if head_err is None else head_err,
        n_kl_bounded=int(bounded_k.sum()),
        refusal_ids=refusal_ids,
        harmful_val_sha256=sha256_text(harmful_val),
        harmless_val_sha256=sha256_text(harmless_val),
        n_harmful_val=len(harmful_val),
        n_harmless_val=len(harmless_val),
        **{f"directions_{k}": v for k, v in dprov.items()},
    )
    logodds = "log-odds"
    spec = {
        "bypass_score": (lp, bypass, logodds, "refusal score of harmful prompts, direction ablated at every layer"),
        "induce_score": (lp, induce, logodds, "refusal score of harmless prompts, mean difference added at the layer"),
        "kl": (lp, kl, "nats", "KL(base || ablated) of harmless next-token distributions"),
        "direction_norm": (lp, norms, "activation units", "norm of the harmful-minus-harmless mean difference"),
        "bypass_prompt": (lp + ("harmful",), bypass_p, logodds, "per-prompt refusal score under ablation"),
        "induce_prompt": (lp + ("harmless",), induce_p, logodds, "per-prompt refusal score under addition"),
        "kl_prompt": (lp + ("harmless",), kl_p, "nats", "per-prompt KL under ablation"),
        "pass_layer": (lp, ch["pass_layer"], "1", f"layer < {ch['layer_cut']}"),
        "pass_kl": (lp, ch["pass_kl"], "1", f"kl < {kl_threshold}"),
        "pass_induce": (lp, ch["pass_induce"], "1", f"induce_score > {induce_threshold}"),
        "passes": (lp, ch["passes"], "1", "passes every filter"),
        "scored_bypass": (lp, scored_b, "1", "bypass score computed (scores='needed' skips some)"),
        "scored_kl": (lp, scored_k, "1", "KL computed (scores='needed' skips some)"),
        "scored_induce": (lp, scored_i, "1", "induce score computed (scores='needed' skips some)"),
        "bounded_kl": (lp, bounded_k, "1", "KL stopped early: the prompts scored prove it fails the filter"),
        "kl_lower_bound": (lp, kl_bound, "nats", "lower bound on kl where bounded_kl (NaN elsewhere)"),
        "baseline_harmful": (("harmful",), base_h, logodds, "refusal score of harmful prompts, no edit"),
        "baseline_harmless": (("harmless",), base_s, logodds, "refusal score of harmless prompts, no edit"),
    }
    data = {k: xr.Variable(d, v, attrs={"units": u, "long_name": n}) for k, (d, v, u, n) in spec.items()}
    return xr.Dataset(
        data,
        coords={
            "layer": cand_layers,
            "pos": cand_pos,
            "harmful": np.arange(len(harmful_val)),
            "harmless": np.arange(len(harmless_val)),
        },
        attrs=prov,
    )


def chosen(ds: Any) -> tuple[int, int]:
    """(layer, pos) chosen by `select_direction`."""
    return int(ds.attrs["chosen_layer"]), int(ds.attrs["chosen_pos"])
