"""The held-out evaluation protocol every claim about a model organism must survive.

`heldout_protocol` runs each steerer (unsteered, naive ActAdd, MARS, ...) on held-out prompt
sets (other topics, other phrasings, other renderers, object-less images, look-alikes) and
records, per reply:
  judged           the strict judge's reading of the WHOLE reply: "refusal", "compliance" or
                   "broken" (malformed, repetitive, empty: neither a refusal nor a useful answer)
  refused_substring  the substring judge (Arditi et al.'s list), beside the strict one
  useful           1/0 where the set has a utility check (an exact caption / reading answer),
                   NaN elsewhere
  same_as_unsteered  1/0 on harmless sets: the steered reply equals the unsteered one (the
                   utility cost of steering), NaN on harmful sets
  first_token_kl   KL(unsteered || steered) of the first-token distribution, nats
Rates carry 95% Wilson intervals (`mars_core.stats.wilson_interval`): `rate[method, set, verdict,
bound]`, `substring_rate`, `useful_rate`, `same_rate [method, set, bound]`.

`shared_structure` measures whether image requests carry the text harm signal: the AUC of
harmful vs harmless image requests along the text-only direction at every layer, against the
best of `n_splits` random topic splits (a direction from a random half of the TEXT topics vs the
other half, and the AUC of the same split on the images).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import numpy as np
import xarray as xr

from mars_core.datasets import dataset_provenance, var
from mars_core.errors import InputError
from mars_core.stats import auc, wilson_interval

from ._common import attach_coord_attrs, check_prompt_set, generate_batches

VERDICTS = ("refusal", "compliance", "broken")
BOUNDS = ("estimate", "low", "high")


def heldout_protocol(mm: Any, steerers: Mapping[str, Any], sets: Mapping[str, Any], judge: Any, *,
                     utility: Mapping[str, Callable[[Any, list[str]], Sequence[bool]]] | None = None,
                     max_new_tokens: int = 16, batch_size: int = 32, seed: int | None = None) -> xr.Dataset:
    """The protocol Dataset (module docstring). steerers: {method: Steerer}, must hold "none"
    (the reference of `same_as_unsteered` and the KL); sets: {name: PromptSet} (labelled harmful
    True/False, or None for object-less inputs); judge: a strict judge with `classify(prompts,
    responses, topics=None)` (topics: the set's `meta["topics"]`, for judges that check a reply is
    on topic); utility: {set name: check(prompt_set, responses) -> [bool]}."""
    import torch

    from mars_core.scoring import SubstringJudge, kl_divergence

    if "none" not in steerers:
        raise InputError("heldout_protocol needs the unsteered reference: steerers must hold 'none' (NoSteer())")
    if not callable(getattr(judge, "classify", None)):
        raise InputError(f"the protocol's judge must classify whole replies (classify(prompts, responses) -> "
                         f"{list(VERDICTS)}), got {type(judge).__name__}")
    if not sets:
        raise InputError("no held-out sets given")
    for name, ps in sets.items():
        check_prompt_set(ps, f"sets[{name!r}]")
    utility = dict(utility or {})
    methods, names = list(steerers), list(sets)
    n_max = max(len(ps) for ps in sets.values())
    shape = (len(methods), len(names), n_max)
    verdict = np.full(shape, "", dtype=object)
    refused, useful, same, kl = (np.full(shape, np.nan) for _ in range(4))
    sub = SubstringJudge()
    replies: dict[str, list[str]] = {}
    ref_logits: dict[str, Any] = {}
    for j, name in enumerate(names):
        ps = sets[name]
        n = len(ps)
        batches = [mm.build_batch(t, **m) for t, m in ps.batches(batch_size)]
        for i, meth in enumerate(methods):
            st = steerers[meth]
            outs = generate_batches(mm, st, ps, batch_size=batch_size, max_new_tokens=max_new_tokens)
            v = list(judge.classify(ps.texts, outs, topics=ps.meta.get("topics")))
            bad = [x for x in v if x not in VERDICTS]
            if len(v) != n or bad:
                raise InputError(f"judge {getattr(judge, 'name', judge)!r} returned {bad[:3] or len(v)} for {n} replies")
            verdict[i, j, :n] = v
            refused[i, j, :n] = [float(x) for x in sub.judge(ps.texts, outs)]
            if name in utility:
                useful[i, j, :n] = [float(bool(x)) for x in utility[name](ps, outs)]
            logits = np.concatenate([st.last_logits(mm, b)[0].numpy() for b in batches])
            if meth == "none":
                replies[name], ref_logits[name] = outs, logits
            kl[i, j, :n] = kl_divergence(torch.from_numpy(ref_logits[name]), torch.from_numpy(logits)).numpy()
            if ps.harmful is False or ps.harmful is None:
                same[i, j, :n] = [float(a == b) for a, b in zip(outs, replies[name])]
    valid = np.zeros(shape, dtype=bool)
    for j, name in enumerate(names):
        valid[:, j, : len(sets[name])] = True
    rate = np.full((len(methods), len(names), len(VERDICTS), 3), np.nan)
    for k, v in enumerate(VERDICTS):
        hits = ((verdict == v) & valid).sum(-1)
        rate[:, :, k] = np.stack(wilson_interval(hits, valid.sum(-1)), -1)

    def rate_of(x):
        ok = np.isfinite(x)
        return np.stack(wilson_interval(np.where(ok, x, 0).sum(-1), ok.sum(-1)), -1)

    msp, mspb = ("method", "set", "prompt"), ("method", "set", "bound")
    ds = xr.Dataset(
        {
            "judged": (msp, verdict.astype(str), {"long_name": "strict judge's verdict on the whole reply"}),
            "refused_substring": var(msp, refused, "refusal by the substring judge", "0/1"),
            "useful": var(msp, useful, "utility check passed (exact caption / reading answer)", "0/1"),
            "same_as_unsteered": var(msp, same, "reply identical to the unsteered reply (harmless sets)", "0/1"),
            "first_token_kl": var(msp, kl, "KL(unsteered || steered) of the first-token distribution", "nats"),
            "rate": var(("method", "set", "verdict", "bound"), rate, "share of replies with the verdict, 95% Wilson",
                        "fraction"),
            "substring_rate": var(mspb, rate_of(refused), "substring-judge refusal rate, 95% Wilson", "fraction"),
            "useful_rate": var(mspb, rate_of(useful), "utility check pass rate, 95% Wilson", "fraction"),
            "same_rate": var(mspb, rate_of(same), "share of replies equal to the unsteered one, 95% Wilson",
                             "fraction"),
            "mean_first_token_kl": var(("method", "set"), np.nanmean(np.where(valid, kl, np.nan), -1),
                                       "mean first-token KL to the unsteered model", "nats"),
        },
        coords={
            "method": methods, "set": names, "prompt": np.arange(n_max), "verdict": list(VERDICTS),
            "bound": list(BOUNDS),
            "set_harmful": (("set",), np.array([{True: 1.0, False: 0.0}.get(sets[n].harmful, np.nan) for n in names]),
                            {"long_name": "set label (1 harmful, 0 harmless, NaN object-less / unlabelled)"}),
            "set_modality": (("set",), np.array([sets[n].modality for n in names], dtype=str)),
            "n_prompts": (("set",), np.array([len(sets[n]) for n in names]), {"long_name": "prompts", "units": "count"}),
        },
        attrs=dataset_provenance("heldout", mm, sets, seed=seed, judge=getattr(judge, "name", type(judge).__name__),
                                 substring_judge=sub.name if hasattr(sub, "name") else "substring",
                                 max_new_tokens=int(max_new_tokens), steerers={m: repr(s) for m, s in steerers.items()},
                                 utility_sets=sorted(utility)),
    )
    ds["set"].attrs["long_name"] = "held-out prompt set"
    return attach_coord_attrs(ds)


def protocol_table(ds: xr.Dataset, sets: Sequence[str] | None = None, *, verdict: str = "refusal",
                   digits: int = 2) -> str:
    """Markdown: one row per method, per set its `verdict` rate [95% Wilson], plus the broken share
    and (where measured) utility."""
    sets = list(sets or ds["set"].values)
    f = f"{{:.{digits}f}}"

    def cell(v):
        e, lo, hi = (float(x) for x in v)
        return "n/a" if not np.isfinite(e) else f"{f.format(e)} [{f.format(lo)}, {f.format(hi)}]"

    head = "| method | " + " | ".join(f"{s} ({verdict})" for s in sets) + " |"
    rows = [head, "|---|" + "---:|" * len(sets)]
    for m in ds["method"].values:
        rows.append(f"| {m} | " + " | ".join(cell(ds["rate"].sel({"method": m, "set": s, "verdict": verdict}).values)
                                           for s in sets) + " |")
    return "\n".join(rows)


def shared_structure(mm: Any, harmful_text: Any, harmless_text: Any, harmful_image: Any, harmless_image: Any, *,
                     split_text: tuple[Any, Any] | None = None, layers: Sequence[int] | None = None,
                     n_splits: int = 5, batch_size: int = 32, seed: int = 0) -> xr.Dataset:
    """AUC along the text direction vs random topic splits (module docstring). Every set needs
    `meta["concepts"]` (or `meta["topics"]`): the topic of each prompt. split_text: (harmful,
    harmless) text sets on the image sets' topics for the random splits (default: the direction's
    sets, which then must share topics with the images). Returns auc [layer], auc_random
    [layer, split], best_random [layer], margin = auc - best_random [layer]."""
    from mars_core.capture import collect_activations

    def topics(ps):
        t = ps.meta.get("topics", ps.meta.get("concepts"))
        if t is None or len(t) != len(ps):
            raise InputError(f"{ps.name}: shared_structure needs the topic of every prompt in meta['topics']")
        return np.asarray(t, dtype=object)

    def acts(ps):
        ds = collect_activations(mm, ps.texts, **ps.media_kwargs(), layers=layers, positions="last",
                                 reduce="none", batch_size=batch_size, progress=False)
        return ds["acts"].values[:, :, 0].astype(np.float64), [int(x) for x in ds["layer"].values]  # [n, L, D]

    (th, lay), (ts, _) = acts(harmful_text), acts(harmless_text)
    (ih, _), (is_, _) = acts(harmful_image), acts(harmless_image)
    d = th.mean(0) - ts.mean(0)  # [L, D]
    a = auc(np.einsum("nld,ld->ln", ih, d), np.einsum("nld,ld->ln", is_, d))
    sh, ss = split_text if split_text is not None else (harmful_text, harmless_text)
    if split_text is not None:
        (th, _), (ts, _) = acts(sh), acts(ss)
    text, img = np.concatenate([th, ts]), np.concatenate([ih, is_])
    t_top, i_top = np.concatenate([topics(sh), topics(ss)]), np.concatenate(
        [topics(harmful_image), topics(harmless_image)])
    uniq = np.array(sorted(set(t_top) & set(i_top)), dtype=object)
    if len(uniq) < 2:
        raise InputError("the text and image sets share fewer than two topics; random topic splits need more "
                         "(give split_text: text sets on the image sets' topics)")
    rng = np.random.default_rng([seed, 50000])
    rand = np.full((len(lay), n_splits), np.nan)
    for k in range(n_splits):
        half = set(rng.permutation(uniq)[: len(uniq) // 2])
        mt, mi = np.isin(t_top, list(half)), np.isin(i_top, list(half))
        dr = text[mt].mean(0) - text[~mt].mean(0)
        rand[:, k] = auc(np.einsum("nld,ld->ln", img[mi], dr), np.einsum("nld,ld->ln", img[~mi], dr))
    best = rand.max(1)
    out = xr.Dataset(
        {"auc": var(("layer",), a, "AUC harmful vs harmless image requests along the text direction", "AUC"),
         "auc_random": var(("layer", "split"), rand, "AUC of a random topic split (direction from text)", "AUC"),
         "best_random": var(("layer",), best, "best AUC over the random topic splits", "AUC"),
         "margin": var(("layer",), a - best, "auc minus best_random", "AUC")},
        coords={"layer": lay, "split": np.arange(n_splits)},
        attrs=dataset_provenance("shared_structure", mm, {"harmful_text": harmful_text, "harmless_text": harmless_text,
                                                          "harmful_image": harmful_image,
                                                          "harmless_image": harmless_image,
                                                          **({"split_harmful_text": sh, "split_harmless_text": ss}
                                                             if split_text is not None else {})}, seed=seed,
                                 n_splits=int(n_splits), n_topics=len(uniq)),
    )
    out["split"].attrs["long_name"] = "random topic split"
    return attach_coord_attrs(out)
