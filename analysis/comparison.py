"""Method comparison: refusal on harmful / harmless requests per modality, and utility, with CIs.

1. `evaluate_methods` runs every steerer on every evaluation set (one steered `generate` per
   batch) and keeps per-prompt 0/1 outcomes: judged refusal for the refusal metrics
   (`harmful_text`, ..., `harmless_video`), `caption_check` for the utility metric(s)
   (`caption_accuracy`).
2. `method_comparison` turns them into the Dataset of docs/datasets.md "comparison":
   value[method, metric, bound] with bound = estimate (the mean over prompts), low, high (the
   2.5 and 97.5 percentiles of the mean over `n_boot` bootstrap resamples of the prompts; the
   same resamples for every method of a metric, so the CIs are paired).
3. `comparison_table_markdown` / `comparison_json` render it as comparison.md / .json.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import xarray as xr

from mars_core.errors import InputError
from mars_core.prompts import PromptSet
from mars_core.stats import bootstrap_mean_ci

from ._common import (
    dataset_provenance,
    attach_coord_attrs,
    check_judge,
    check_model_takes,
    check_prompt_set,
    generate_batches,
    var,
)

__all__ = [
    "METRICS",
    "UTILITY_METRICS",
    "PerPrompt",
    "evaluate_methods",
    "method_comparison",
    "comparison_table_markdown",
    "comparison_json",
]

METRICS = ("harmful_text", "harmful_image", "harmful_video", "harmless_text", "harmless_image", "harmless_video",
           "caption_accuracy")
UTILITY_METRICS = ("caption_accuracy",)
BOUNDS = ("estimate", "low", "high")


class PerPrompt(dict):
    """{method: {metric: [n] float64 array of per-prompt 0/1 outcomes}}, with `.provenance`
    (the model's and the evaluation sets' provenance) that `method_comparison` copies."""

    def __init__(self, *args: Any, provenance: dict | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.provenance = dict(provenance or {})


def evaluate_methods(
    mm: Any,
    steerers: Mapping[str, Any],
    eval_sets: Mapping[str, PromptSet],
    *,
    judge: Any,
    caption_check: Callable[[PromptSet, list[str]], Sequence[bool]] | None = None,
    max_new_tokens: int = 8,
    batch_size: int = 8,
    utility_metrics: Sequence[str] = UTILITY_METRICS,
    seed: int | None = None,
) -> PerPrompt:
    """Per-prompt outcomes of every steerer on every evaluation set.

    steerers: {method name: Steerer} (e.g. "none": NoSteer(), "mars": MARS(...)).
    eval_sets: {metric: PromptSet}; metric names of docs/datasets.md ("harmful_image", ...,
        "caption_accuracy"); a "harmful_<modality>" / "harmless_<modality>" set must be of that
        modality. Other names are allowed (scored as refusal unless in `utility_metrics`).
    judge: a `mars_core.scoring.Judge` (None: `SubstringJudge()`); 1 = refusal.
    caption_check: `caption_check(prompt_set, responses) -> list[bool]` (True = correct), for
        the utility metrics (reference answers can travel in `prompt_set.meta`); required when a
        utility metric is in eval_sets.
    Returns PerPrompt {method: {metric: [n] float64 of 0/1}}.
    """
    steerers, eval_sets = dict(steerers or {}), dict(eval_sets or {})
    if not steerers:
        raise InputError("steerers is empty; give {method name: Steerer}")
    if not eval_sets:
        raise InputError("eval_sets is empty; give {metric: PromptSet}, e.g. {'harmful_image': ...}")
    for name, st in steerers.items():
        if not callable(getattr(st, "generate", None)):
            raise InputError(f"steerers[{name!r}] is a {type(st).__name__}, not a Steerer (no generate method)")
    utility = set(utility_metrics)
    for metric, ps in eval_sets.items():
        want = None
        for side in ("harmful_", "harmless_"):
            if metric.startswith(side) and metric[len(side):] in ("text", "image", "video"):
                want = metric[len(side):]
        check_prompt_set(ps, f"eval_sets[{metric!r}]", want)
        check_model_takes(mm, ps.modality, f"eval_sets[{metric!r}]")
        if metric in utility and caption_check is None:
            raise InputError(f"eval_sets has the utility metric {metric!r} but caption_check is None")
    judge = check_judge(judge)

    out = PerPrompt(provenance=dataset_provenance(
        "comparison", mm, eval_sets, seed=seed, judge=getattr(judge, "name", type(judge).__name__),
        max_new_tokens=int(max_new_tokens), steerers={n: repr(s) for n, s in steerers.items()}))
    for name, st in steerers.items():
        res: dict[str, np.ndarray] = {}
        for metric, ps in eval_sets.items():
            responses = generate_batches(mm, st, ps, batch_size=batch_size, max_new_tokens=max_new_tokens)
            verdicts = list(caption_check(ps, responses) if metric in utility else judge.judge(ps.texts, responses))
            if len(verdicts) != len(ps):
                raise InputError(f"{metric}: got {len(verdicts)} verdicts for {len(ps)} responses")
            res[metric] = np.asarray([1.0 if bool(v) else 0.0 for v in verdicts], dtype=np.float64)
        out[name] = res
    return out


def method_comparison(
    per_prompt: Mapping[str, Mapping[str, Sequence[float]]],
    *,
    n_boot: int = 1000,
    seed: int = 0,
    ci: float = 0.95,
) -> xr.Dataset:
    """Estimates and percentile-bootstrap CIs per method and metric (module docstring).

    per_prompt: {method: {metric: per-prompt values}} (e.g. from `evaluate_methods`); values
    are finite numbers (0/1 outcomes). Every metric of docs/datasets.md is in the `metric` axis
    (NaN where not measured), followed by any other metric given. Resamples are drawn from
    `np.random.default_rng([seed, metric index, n])` (`mars_core.stats.bootstrap_mean_ci`, i.e.
    `scipy.stats.bootstrap`, percentile method), so a metric's CIs do not change when methods are
    added.

    Returns dims method, metric, bound (estimate, low, high); var value (fraction). attrs: the
    provenance of `per_prompt.provenance` when it has one (a `PerPrompt`; `seed` is then the
    evaluation's seed, else the bootstrap seed), `bootstrap_seed`, `n_boot`, `ci` and
    `n_prompts` (JSON {method: {metric: n}}).
    """
    if not per_prompt:
        raise InputError("per_prompt is empty; give {method: {metric: per-prompt 0/1 values}}")
    n_boot, ci = int(n_boot), float(ci)
    if n_boot < 1:
        raise InputError(f"n_boot={n_boot}; must be >= 1")
    if not 0.0 < ci < 1.0:
        raise InputError(f"ci={ci}; must be in (0, 1)")
    methods = list(per_prompt)
    data: dict[str, dict[str, np.ndarray]] = {}
    extra: list[str] = []
    for m in methods:
        if not isinstance(per_prompt[m], Mapping):
            raise InputError(f"per_prompt[{m!r}] must be {{metric: values}}, got {type(per_prompt[m]).__name__}")
        data[m] = {}
        for metric, vals in per_prompt[m].items():
            arr = np.asarray(vals, dtype=np.float64)
            if arr.ndim != 1:
                raise InputError(f"per_prompt[{m!r}][{metric!r}] must be 1-D per-prompt values, got shape {arr.shape}")
            if not np.isfinite(arr).all():
                raise InputError(f"per_prompt[{m!r}][{metric!r}] has NaN/inf values")
            data[m][metric] = arr
            if metric not in METRICS and metric not in extra:
                extra.append(metric)
    metrics = list(METRICS) + extra
    value = np.full((len(methods), len(metrics), 3), np.nan)
    n_prompts: dict[str, dict[str, int]] = {m: {} for m in methods}
    for j, metric in enumerate(metrics):
        for i, m in enumerate(methods):
            x = data[m].get(metric)
            if x is None or x.size == 0:
                continue
            n_prompts[m][metric] = int(x.size)
            # the stream depends on (seed, metric, n) only: every method of a metric of the same size
            # gets the same resamples, so the CIs are paired
            value[i, j] = bootstrap_mean_ci(x, n_boot=n_boot, confidence=ci, seed=[int(seed), j, int(x.size)])

    prov = getattr(per_prompt, "provenance", None) or dataset_provenance("comparison", None, None, seed=int(seed))
    attrs = {**prov, "analysis": "comparison", "bootstrap_seed": int(seed), "n_boot": n_boot, "ci": ci,
             "ci_method": "percentile bootstrap over prompts, paired across methods",
             "n_prompts": n_prompts}
    ds = xr.Dataset(
        {"value": var(("method", "metric", "bound"), value, "refusal rate or utility", "fraction")},
        coords={"method": methods, "metric": metrics, "bound": list(BOUNDS)},
        attrs=attrs,
    )
    return attach_coord_attrs(ds)


def _check_comparison(ds: xr.Dataset) -> None:
    if not isinstance(ds, xr.Dataset) or "value" not in ds or set(ds["value"].dims) != {"method", "metric", "bound"}:
        raise InputError("expected the Dataset of method_comparison (var value[method, metric, bound])")


_LABELS = {
    "harmful_text": "harmful text", "harmful_image": "harmful image", "harmful_video": "harmful video",
    "harmless_text": "harmless text", "harmless_image": "harmless image", "harmless_video": "harmless video",
    "caption_accuracy": "caption accuracy",
}


def comparison_table_markdown(ds: xr.Dataset, *, digits: int = 2, drop_empty: bool = True) -> str:
    """A Markdown table: one row per method, one column per metric, cells "est [low, high]".

    Metrics measured for no method are left out (`drop_empty`); unmeasured cells show "n/a".
    """
    _check_comparison(ds)
    v = ds["value"].transpose("method", "metric", "bound")
    metrics = [str(m) for m in ds["metric"].values]
    if drop_empty:
        metrics = [m for m in metrics if np.isfinite(v.sel(metric=m).values).any()]
    f = f"{{:.{int(digits)}f}}"
    head = "| method | " + " | ".join(_LABELS.get(m, m.replace("_", " ")) for m in metrics) + " |"
    rule = "|---|" + "---:|" * len(metrics)
    rows = [head, rule]
    for meth in ds["method"].values:
        cells = []
        for m in metrics:
            est, lo, hi = (float(v.sel({"method": meth, "metric": m, "bound": b})) for b in BOUNDS)
            cells.append("n/a" if not math.isfinite(est) else f"{f.format(est)} [{f.format(lo)}, {f.format(hi)}]")
        rows.append(f"| {meth} | " + " | ".join(cells) + " |")
    n_boot = ds.attrs.get("n_boot", "")
    ci = ds.attrs.get("ci", 0.95)
    note = (f"\nRefusal rates (harmful/harmless) and caption accuracy as fractions of prompts; "
            f"[low, high]: {round(100 * float(ci))}% percentile bootstrap CI over prompts"
            + (f" ({n_boot} resamples)" if n_boot != "" else "") + ".\n")
    return "\n".join(rows) + "\n" + note


def _json_safe(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, (np.floating,)):
        return _json_safe(float(x))
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.bool_,)):
        return bool(x)
    if isinstance(x, np.ndarray):
        return [_json_safe(v) for v in x.tolist()]
    if isinstance(x, dict):
        return {str(k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


def comparison_json(ds: xr.Dataset) -> dict[str, Any]:
    """A JSON-able dict: {"methods", "metrics", "bounds", "values": {method: {metric: {estimate,
    low, high}}} (null where not measured), "units", "attrs" (provenance)}."""
    _check_comparison(ds)
    v = ds["value"].transpose("method", "metric", "bound")
    methods = [str(m) for m in ds["method"].values]
    metrics = [str(m) for m in ds["metric"].values]
    values = {
        meth: {m: {b: _json_safe(float(v.sel({"method": meth, "metric": m, "bound": b}))) for b in BOUNDS} for m in metrics}
        for meth in methods
    }
    return {
        "analysis": "comparison",
        "methods": methods,
        "metrics": metrics,
        "bounds": list(BOUNDS),
        "units": ds["value"].attrs.get("units", "fraction"),
        "values": values,
        "attrs": _json_safe(dict(ds.attrs)),
    }
