"""MARS's gate (threshold `tau`, gain, trust-region margin), fitted on safe data only.

MARS steers a prompt only when its (re-centered) harmfulness score `s` exceeds `tau`, with
strength `min(gain * Delta * (s - tau), cap)` where the trust region caps the steered projection
at `p_harm + margin * Delta` (`mars_core.steering.MARS`, `docs/method.md`). `select_mars_gate`
evaluates a grid of (tau, gain, margin) and keeps the *most permissive* gate whose MARS adds at
most `max_increase` first-token refusals to each safe prompt set (harmless text, harmless image
requests, caption prompts, ... of every modality the model will see), compared with the
unsteered model on the same prompts: the smallest feasible `tau`, then the largest `gain`, then
the largest `margin`. No harmful multimodal prompt is used.

`select_mars_tau` is the one-axis case (gain and margin fixed).

Refusal here is the first-token criterion (refusal log-odds > 0, `mars_core.scoring`), which
costs one forward per prompt and grid point; behaviour under generation is measured elsewhere.
"""

from __future__ import annotations

import warnings
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from ..errors import InputError
from ..prompts import PromptSet

DEFAULT_TAUS = tuple(float(t) for t in np.round(np.arange(0.0, 1.0001, 0.05), 2))
DEFAULT_GAINS = (2.0, 4.0, 8.0, 16.0)
# 0: never push a prompt past the text harmful centroid; 0.5: the steering operator's default
DEFAULT_MARGINS = (0.0, 0.5)


def _refusal_rate(mm: Any, batches: Sequence[Any], steerer: Any, refusal_ids: Sequence[int],
                  caches: Sequence[Any] | None = None) -> float:
    """Fraction of the prompts in `batches` whose first-token refusal log-odds is > 0 under
    `steerer`; with `caches` (one `PrefixCache` per batch) scored over the prompt caches."""
    from ..scoring import first_token_refusal_score, refusal_scores_many

    if caches is not None:
        scores = torch.cat([first_token_refusal_score(c.logits(steerer)[0], refusal_ids) for c in caches])
    else:
        scores = refusal_scores_many(mm, batches, refusal_ids, steerer)
    return float((np.asarray(scores, dtype=np.float64) > 0.0).mean())


def _grid(values: Sequence[float], name: str, example: str) -> list[float]:
    out = sorted({float(v) for v in values})
    if not out:
        raise InputError(f"{name} is empty; give a grid such as mars_core.steering.gate.{example}")
    if any(not np.isfinite(v) or v < 0 for v in out):
        raise InputError(f"{name}={list(values)} must be finite and >= 0")
    return out


def select_mars_gate(
    mm: Any,
    calibration: Any,
    layer: int,
    safe_sets: Mapping[str, PromptSet],
    *,
    taus: Sequence[float] = DEFAULT_TAUS,
    gains: Sequence[float] = DEFAULT_GAINS,
    margins: Sequence[float] = DEFAULT_MARGINS,
    max_increase: float = 0.05,
    refusal_ids: Sequence[int] | None = None,
    batch_size: int = 32,
    mars_kwargs: Mapping[str, Any] | None = None,
    full_grid: bool = False,
    reuse_prefix: bool | None = None,
    prefix_store: Any = None,
):
    """The most permissive MARS gate at `layer` that keeps every safe set within `max_increase`.

    For each (gain, margin) the taus are scored in increasing order (other MARS settings from
    `mars_kwargs`) up to the first feasible one; larger taus are only scored with
    `full_grid=True` (their `rate` is NaN otherwise, `evaluated` says which points ran), and
    never past the smallest feasible tau found so far. Among the feasible points the smallest
    tau wins, then the largest gain, then the largest margin (exact under early stopping: each
    (gain, margin) contributes its smallest feasible tau if it can still win).
    Returns `(gate, xarray.Dataset)`: `gate = {"tau", "gain", "margin"}` (ready for
    `MARS(calibration, layer, **gate)`); the Dataset has `rate [set, tau, gain, margin]` (refusal
    rate under MARS), `base_rate [set]` (unsteered), `increase`, `feasible [tau, gain, margin]`,
    `evaluated [tau, gain, margin]`, `gate_open [set]` (share of each safe set whose re-centred
    score exceeds the chosen tau; a warning when it is over half), `n_prompts [set]`, attrs `selected_tau/gain/margin`,
    `max_increase`, `fallback` (True when no point is feasible: the most closed gate, largest
    tau, smallest gain and margin, is returned and a warning issued) and the sets' hashes.
    reuse_prefix (None: when the model runs locally): every grid point is scored over one
    `PrefixCache` per safe-set batch (one prefill per batch for the whole grid, then one
    single-token forward per batch and point, the unsteered rate included; the caches are held
    until this call returns, or in `prefix_store`, a `PrefixStore`, when one is given); False: a
    full forward per batch and point (remotely, one request per batch group).
    """
    import xarray as xr

    from ..datasets import dataset_provenance, var
    from ..scoring import refusal_token_ids
    from .baselines import NoSteer
    from .mars import MARS

    if not safe_sets:
        raise InputError("the MARS gate needs at least one safe prompt set (harmless text, harmless images, ...)")
    for name, ps in safe_sets.items():
        if ps.harmful:
            raise InputError(f"safe set {name!r} is labelled harmful; the gate is fitted on safe data only")
    taus = _grid(taus, "taus", "DEFAULT_TAUS")
    gains = _grid(gains, "gains", "DEFAULT_GAINS")
    margins = _grid(margins, "margins", "DEFAULT_MARGINS")
    if not 0.0 <= max_increase < 1.0:
        raise InputError(f"max_increase={max_increase}; use a rate in [0, 1)")
    kw = {k: v for k, v in dict(mars_kwargs or {}).items() if k not in ("tau", "gain", "margin")}
    ids = list(refusal_ids) if refusal_ids is not None else refusal_token_ids(mm.tokenizer)
    names = list(safe_sets)
    batches = {n: [mm.build_batch(t, **m) for t, m in safe_sets[n].batches(batch_size)] for n in names}
    from ..remote import resolve
    from .sweep import PrefixCache

    if reuse_prefix is None:
        reuse_prefix = not resolve(mm)
    if prefix_store is not None:
        prefix_store.check_model(mm, "select_mars_gate")
    make = prefix_store.get if prefix_store is not None else (lambda b: PrefixCache(mm, b))
    caches = {n: [make(b) for b in batches[n]] if reuse_prefix else None for n in names}
    base = np.array([_refusal_rate(mm, batches[n], NoSteer(), ids, caches[n]) for n in names])
    rate = np.full((len(names), len(taus), len(gains), len(margins)), np.nan)
    last = len(taus) - 1  # without full_grid: no tau above the smallest feasible one found so far
    for k, g in enumerate(gains):
        for m_, mg in enumerate(margins):
            for j, t in enumerate(taus[: last + 1]):
                st = MARS(calibration, layer, tau=t, gain=g, margin=mg, **kw)
                for i, n in enumerate(names):
                    rate[i, j, k, m_] = _refusal_rate(mm, batches[n], st, ids, caches[n])
                if not full_grid and (rate[:, j, k, m_] - base <= max_increase + 1e-12).all():
                    last = j
                    break
    inc = rate - base[:, None, None, None]
    evaluated = ~np.isnan(rate).any(axis=0)
    feasible = evaluated & (np.nan_to_num(inc, nan=np.inf) <= max_increase + 1e-12).all(axis=0)
    fallback = not feasible.any()
    if fallback:
        j, k, m_ = len(taus) - 1, 0, 0
        warnings.warn(f"no MARS gate on the grid keeps every safe set within +{max_increase:.2f} refusal; "
                      f"using the most closed one (tau={taus[j]}, gain={gains[k]}, margin={margins[m_]})",
                      stacklevel=2)
    else:
        # lexicographic: smallest tau, then largest gain, then largest margin
        j, k, m_ = max(zip(*np.nonzero(feasible)), key=lambda p: (-p[0], p[1], p[2]))
    gate = {"tau": float(taus[j]), "gain": float(gains[k]), "margin": float(margins[m_])}
    # how often the chosen gate opens (re-centred score s > tau) on each safe set
    chosen = MARS(calibration, layer, **gate, **kw)
    opens = []
    for n in names:
        recs = [c.logits(chosen)[1] for c in caches[n]] if caches[n] else \
            [chosen.last_logits(mm, b)[1] for b in batches[n]]
        opens.append(float(torch.cat([r["score"].reshape(-1) for r in recs]).gt(gate["tau"]).double().mean()))
    opens = np.array(opens)
    caches.clear()  # the prompt caches are not needed past this point
    wide = [f"{n} {o:.0%}" for n, o in zip(names, opens) if o > 0.5]
    if wide:
        warnings.warn(f"the fitted MARS gate (tau={gate['tau']:g}) opens on most prompts of safe set(s) "
                      f"{', '.join(wide)}: the gain and trust region, not the gate, keep them from refusing",
                      stacklevel=2)
    tgm = ("tau", "gain", "margin")
    ds = xr.Dataset(
        {
            "rate": var(("set",) + tgm, rate, "first-token refusal rate of the safe set under MARS", "fraction"),
            "base_rate": var(("set",), base, "first-token refusal rate of the safe set, unsteered", "fraction"),
            "increase": var(("set",) + tgm, inc, "refusal rate under MARS minus unsteered", "fraction"),
            "feasible": (tgm, feasible, {"long_name": f"every safe set within +{max_increase:g} refusal"}),
            "evaluated": (tgm, evaluated, {"long_name": "grid point scored (early stopping skips the rest)"}),
            "gate_open": var(("set",), opens, "share of the safe set with the chosen gate open (s > tau)", "fraction"),
            "n_prompts": (("set",), np.array([len(safe_sets[n]) for n in names]),
                          {"long_name": "prompts in the safe set", "units": "count"}),
        },
        coords={"set": names, "tau": taus, "gain": gains, "margin": margins},
        attrs=dataset_provenance(
            "mars_gate", mm, {f"safe_{n}": safe_sets[n] for n in names}, seed=None,
            selected_tau=gate["tau"], selected_gain=gate["gain"], selected_margin=gate["margin"],
            layer=int(layer), max_increase=float(max_increase), fallback=bool(fallback),
            criterion="first-token refusal log-odds > 0",
            rule="smallest feasible tau, then largest gain, then largest margin",
            full_grid=bool(full_grid), mars_kwargs=dict(kw),
            calibration_fingerprint=calibration.fingerprint,
        ),
    )
    ds["tau"].attrs.update({"long_name": "gate threshold on s", "units": "text gap (0 = harmless centroid)"})
    ds["gain"].attrs.update({"long_name": "MARS gain", "units": "x text gap per unit of s above tau"})
    ds["margin"].attrs.update({"long_name": "trust-region margin", "units": "x text gap beyond the harmful centroid"})
    return gate, ds


def select_mars_tau(
    mm: Any,
    calibration: Any,
    layer: int,
    safe_sets: Mapping[str, PromptSet],
    *,
    taus: Sequence[float] = DEFAULT_TAUS,
    max_increase: float = 0.05,
    refusal_ids: Sequence[int] | None = None,
    batch_size: int = 32,
    mars_kwargs: Mapping[str, Any] | None = None,
    full_grid: bool = False,
    reuse_prefix: bool | None = None,
):
    """Smallest `tau` in `taus` whose MARS (gain and margin from `mars_kwargs`, else the
    operator's defaults 2 and 0.5) keeps every safe set within `max_increase`.

    Returns `(tau, xarray.Dataset)` with `rate / increase [set, tau]` (NaN above the chosen tau
    unless `full_grid`), `base_rate [set]`, `feasible / evaluated [tau]` and the attrs of `select_mars_gate` (whose one-axis case this is).
    """
    kw = dict(mars_kwargs or {})
    gate, ds = select_mars_gate(
        mm, calibration, layer, safe_sets, taus=taus, gains=[kw.pop("gain", 2.0)], margins=[kw.pop("margin", 0.5)],
        max_increase=max_increase, refusal_ids=refusal_ids, batch_size=batch_size, mars_kwargs=kw,
        full_grid=full_grid, reuse_prefix=reuse_prefix,
    )
    return gate["tau"], ds.squeeze(("gain", "margin"), drop=False)
