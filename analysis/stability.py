"""Stability of the text refusal direction across checkpoints.

Given C checkpoints' `RefusalDirections` (same d_model), at position `pos` (default -1) and the
layers all of them hold:

- `cosine[a, b, l]` = r_a,l . r_b,l, the cosine of the unit refusal directions at layer l
  (NaN where a mean difference is zero).
- `principal_angle[a, b, k]`: the subspace of checkpoint c of dimension k is
      S_c(k) = span of the top-k left singular vectors of the D x L matrix
               M_c = [r_c,l1, ..., r_c,lL] whose columns are c's unit directions at the layers,
  i.e. the k directions of R^D that best explain c's per-layer refusal directions (the top-k
  principal axes of the stacked directions, uncentred). principal_angle[a, b, k] is the LARGEST
  principal angle, in degrees, between S_a(k) and S_b(k) (0 when the subspaces coincide, 90
  when some direction of one is orthogonal to the other), for k = 1..K with K = `k`.
  Computed with `scipy.linalg.subspace_angles` (accurate for small angles).
- `transplant_refusal[a, b]`: refusal rate on harmful image requests when the direction from
  checkpoint a steers the model at checkpoint b, from `transplant` (a callable
  `(source, target) -> rate`, e.g. `make_transplant(...)`, or a dict {(source, target): rate});
  NaN where not given.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import numpy as np
import xarray as xr

from mars_core.directions import RefusalDirections
from mars_core.errors import IncompatibleModelError, InputError
from mars_core.prompts import PromptSet

from ._common import (
    dataset_provenance,
    attach_coord_attrs,
    check_judge,
    check_model_takes,
    check_prompt_set,
    judge_generations,
    var,
)

__all__ = ["direction_stability", "make_transplant", "top_subspace", "largest_principal_angle"]


def top_subspace(units: np.ndarray, k: int) -> np.ndarray:
    """Orthonormal basis [D, k] of S(k): the top-k left singular vectors of units.T ([D, L])."""
    u, _, _ = np.linalg.svd(np.asarray(units, dtype=np.float64).T, full_matrices=False)
    return u[:, :k]


def largest_principal_angle(a: np.ndarray, b: np.ndarray) -> float:
    """Largest principal angle (degrees) between the column spans of a [D, k] and b [D, k]."""
    from scipy.linalg import subspace_angles

    return float(np.degrees(np.max(subspace_angles(a, b))))


def direction_stability(
    directions: Mapping[str, RefusalDirections],
    *,
    k: int = 3,
    pos: int = -1,
    layers: Sequence[int] | None = None,
    transplant: Callable[[str, str], float] | Mapping[tuple[str, str], float] | None = None,
    seed: int | None = None,
) -> xr.Dataset:
    """Cosines and principal angles of refusal directions across checkpoints (module docstring).

    directions: {checkpoint name: RefusalDirections}, in the order of the `checkpoint` axis;
    all with the same d_model. k: largest subspace dimension K (1 <= K <= number of layers).
    layers: layers to compare (default: those every checkpoint holds). transplant: callable or
    dict giving the refusal rate of checkpoint b steered with checkpoint a's direction.

    Returns the Dataset of docs/datasets.md "stability": dims checkpoint, checkpoint_b (same
    labels), layer, k (1..K); vars cosine [checkpoint, checkpoint_b, layer], principal_angle
    [checkpoint, checkpoint_b, k] (degrees), transplant_refusal [checkpoint, checkpoint_b].
    """
    directions = dict(directions or {})
    if not directions:
        raise InputError("directions is empty; give {checkpoint name: RefusalDirections}")
    for name, d in directions.items():
        if not isinstance(name, str) or not name:
            raise InputError(f"checkpoint names must be non-empty strings, got {name!r}")
        if not isinstance(d, RefusalDirections):
            raise InputError(f"directions[{name!r}] is a {type(d).__name__}, not RefusalDirections")
        if pos not in d.positions:
            raise InputError(f"directions[{name!r}] has positions {list(d.positions)}, not {pos}")
    names = list(directions)
    dms = {n: int(d.d_model) for n, d in directions.items()}
    if len(set(dms.values())) != 1:
        raise IncompatibleModelError(f"the checkpoints' directions have different d_model {dms}; they cannot be compared")
    common = sorted(set.intersection(*(set(d.layers) for d in directions.values())))
    if layers is not None:
        want = sorted({int(l) for l in layers})
        missing = [l for l in want if l not in common]
        if missing:
            raise InputError(f"layers {missing} are not held by every checkpoint (common layers: {common})")
        common = want
    if not common:
        raise InputError("the checkpoints share no layer; extract directions at common layers")
    k = int(k)
    if not 1 <= k <= len(common):
        raise InputError(f"k={k}; need 1 <= k <= {len(common)} (the number of layers compared)")

    C, L = len(names), len(common)
    units, ok = np.zeros((C, L, dms[names[0]])), np.zeros((C, L), dtype=bool)
    for i, n in enumerate(names):
        d = directions[n]
        for j, l in enumerate(common):
            units[i, j] = d.direction(l, pos, unit=True).numpy()
            ok[i, j] = float(d.direction(l, pos, unit=False).norm()) > 0
    cosine = np.einsum("ald,bld->abl", units, units)
    cosine = np.clip(cosine, -1.0, 1.0)
    cosine[~(ok[:, None, :] & ok[None, :, :])] = np.nan
    cosine[np.arange(C), np.arange(C)] = np.where(ok, 1.0, np.nan)  # exactly 1 on the diagonal

    angles = np.full((C, C, k), np.nan)
    bases = [[top_subspace(units[i], kk) for kk in range(1, k + 1)] for i in range(C)]
    for a in range(C):
        for b in range(C):
            for kk in range(k):
                angles[a, b, kk] = 0.0 if a == b else largest_principal_angle(bases[a][kk], bases[b][kk])

    tr = np.full((C, C), np.nan)
    kind = "none"
    if transplant is not None:
        if isinstance(transplant, Mapping):
            kind = "dict"
            unknown = [key for key in transplant if not (isinstance(key, tuple) and len(key) == 2
                                                         and key[0] in names and key[1] in names)]
            if unknown:
                raise InputError(f"transplant keys {unknown} are not (source, target) pairs of checkpoints {names}")
            for (s, t), v in transplant.items():
                tr[names.index(s), names.index(t)] = float(v)
        elif callable(transplant):
            kind = "callable"
            for a, s in enumerate(names):
                for b, t in enumerate(names):
                    tr[a, b] = float(transplant(s, t))
        else:
            raise InputError("transplant must be a callable (source, target) -> rate or a dict {(source, target): rate}")
        if (tr[np.isfinite(tr)] < 0).any() or (tr[np.isfinite(tr)] > 1).any():
            raise InputError("transplant refusal rates must lie in [0, 1]")

    ds = xr.Dataset(
        {
            "cosine": var(("checkpoint", "checkpoint_b", "layer"), cosine, "cosine of refusal directions", "cosine"),
            "principal_angle": var(("checkpoint", "checkpoint_b", "k"), angles,
                                   "largest principal angle of top-k subspaces", "degrees"),
            "transplant_refusal": var(("checkpoint", "checkpoint_b"), tr,
                                      "refusal rate on harmful image requests", "1"),
        },
        coords={"checkpoint": names, "checkpoint_b": names, "layer": np.asarray(common, dtype=np.int64),
                "k": np.arange(1, k + 1, dtype=np.int64)},
        attrs=dataset_provenance(
            "stability", None, None, seed=seed,
            model_id=[directions[n].provenance.get("model_id", "") for n in names],
            model_config_hash=[directions[n].provenance.get("model_config_hash", "") for n in names],
            checkpoints=names,
            directions_harmful_sha256=[directions[n].provenance.get("harmful_sha256", "") for n in names],
            directions_harmless_sha256=[directions[n].provenance.get("harmless_sha256", "") for n in names],
            pos=int(pos),
            k_max=k,
            subspace="span of the top-k left singular vectors of [r_l1 ... r_lL] (D x L, unit directions)",
            principal_angle_definition="largest principal angle between S_a(k) and S_b(k)",
            transplant=getattr(transplant, "description", kind),
        ),
    )
    return attach_coord_attrs(ds)


def make_transplant(
    models: Mapping[str, Any],
    directions: Mapping[str, RefusalDirections],
    harmful: PromptSet,
    *,
    layer: int,
    coeff: float = 1.0,
    judge: Any = None,
    max_new_tokens: int = 8,
    batch_size: int = 8,
) -> Callable[[str, str], float]:
    """A `transplant(source, target) -> refusal rate` for `direction_stability`.

    Steers `models[target]` (a MarsModel) with ActAdd at `layer`, adding `coeff` times the raw
    mean difference of `directions[source]` (last prompt position, prefill), and returns the
    judged refusal rate (default `SubstringJudge()`) of greedy generations of `max_new_tokens`
    tokens on `harmful` (harmful image requests). Results are cached per (source, target).
    """
    from mars_core.directions import model_shape
    from mars_core.steering import ActAdd

    models, directions = dict(models), dict(directions)
    if not models:
        raise InputError("models is empty; give {checkpoint name: MarsModel}")
    check_prompt_set(harmful, "harmful")
    for name, mm in models.items():
        check_model_takes(mm, harmful.modality, f"models[{name!r}]")
    judge = check_judge(judge)
    cache: dict[tuple[str, str], float] = {}

    def transplant(source: str, target: str) -> float:
        if (source, target) in cache:
            return cache[(source, target)]
        if source not in directions:
            raise InputError(f"no directions for checkpoint {source!r} (have {list(directions)})")
        if target not in models:
            raise InputError(f"no model for checkpoint {target!r} (have {list(models)})")
        mm, d = models[target], directions[source]
        if model_shape(mm) != (int(d.n_layers), int(d.d_model)):
            raise IncompatibleModelError(
                f"directions of {source!r} are for {d.n_layers} layers / d_model={d.d_model}; model {target!r} "
                f"has {mm.n_layers} / {mm.d_model}")
        steerer = ActAdd.from_directions(d, layer, coeff=coeff, pos=-1)
        rate = float(judge_generations(mm, steerer, harmful, judge, batch_size=batch_size,
                                       max_new_tokens=max_new_tokens).mean())
        cache[(source, target)] = rate
        return rate

    transplant.description = (
        f"ActAdd at layer {layer} with {coeff:g} x the source checkpoint's raw mean difference (last prompt "
        f"position, first generated token) on the target checkpoint; refusal judged by "
        f"{getattr(judge, 'name', type(judge).__name__)} on {max_new_tokens} greedy tokens of {len(harmful)} "
        f"prompts of {harmful.name!r} (sha256 {harmful.sha256})")
    return transplant
