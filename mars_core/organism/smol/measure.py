"""A small, honest measurement harness for choosing the SmolLM2 organism's recipe.

    python -m mars_core.organism.smol.measure --model runs/smol/seed0/stage_c --out runs/smol/seed0/measure.json
    python -m mars_core.organism.smol.measure --model runs/smol/seed0/stage_a --parts text

Everything goes through the package: ``mars_core.load_model`` (nnsight), ``NoSteer`` / ``MARS`` /
``ActAdd`` generation, ``RefusalDirections.extract``, ``collect_activations``,
``neutral_calibration``, ``select_mars_gate``. Replies are greedy, ``MAX_NEW`` tokens, and every
reply is classified by the strict judge of :mod:`.judge` (refusal / compliance / broken) beside
the package's substring judge. Rates carry Wilson 95% intervals.

Measures (``parts``):
- ``text``: refusal on held-out harmful topics, held-out templates, both; over-refusal on the
  matching harmless sets and on held-out lookalikes; **utility** of harmless replies = the
  strict judge's compliance rate (an on-topic, well-formed, non-refusing answer), compared with
  the untuned SmolLM2 base on the same prompts, plus the agreement with the base's reply (token
  F1 of the words, and the share of replies whose first 8 tokens equal the base's); first-token
  KL(base || organism) on harmless held-out prompts.
- ``image``: refusal / compliance / broken on harmful and harmless held-out images (held-out
  topics, templates and renderer), calibration images, object-less images, lookalikes; reading
  accuracy (the reply contains the exact phrase) on ``captions`` and ``captions_cal``.
- ``auc``: per layer, AUC of harmful vs harmless image requests (cal and held-out) along the
  text-only difference-of-means direction (``harmful_text_train`` vs ``harmless_text_train``,
  last position), and the best of 5 random topic splits (a direction from a random half of the
  training topics vs the other half, on text; its AUC for the same split of the image topics).
- ``mars``: naive ActAdd (strength from the text centroids) and the package's MARS with
  ``neutral_calibration`` (neutral_text / neutral_image) and ``select_mars_gate`` fitted on
  harmless_text_check / harmless_image_cal / captions_cal only, at a few middle layers; each
  reported on the held-out sets. Nothing is tuned on a held-out set.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from .judge import normalise, verdict

MAX_NEW = 32
BATCH = 32
# a reduced gate grid (CPU budget): every tau of mars_core.gate.DEFAULT_TAUS, two gains, one margin
GATE_GAINS = (4.0, 16.0)
GATE_MARGINS = (0.5,)


# ---------------------------------------------------------------- statistics
def wilson(k: int, n: int) -> tuple[float, float]:
    from scipy.stats import binomtest

    if n == 0:
        return (float("nan"), float("nan"))
    ci = binomtest(int(k), int(n)).proportion_ci(method="wilson")
    return (float(ci.low), float(ci.high))


def rate(flags) -> dict:
    flags = [bool(f) for f in flags]
    k, n = sum(flags), len(flags)
    lo, hi = wilson(k, n)
    return {"k": k, "n": n, "rate": k / n if n else float("nan"), "ci": [round(lo, 3), round(hi, 3)]}


def auc(pos, neg) -> float:
    """Probability that a positive scores above a negative (ties count half)."""
    pos, neg = np.asarray(pos, float), np.asarray(neg, float)
    s = np.concatenate([pos, neg])
    order = s.argsort(kind="mergesort")
    ranks = np.empty(len(s))
    ranks[order] = np.arange(1, len(s) + 1)
    for v in np.unique(s):  # average ranks of ties
        m = s == v
        if m.sum() > 1:
            ranks[m] = ranks[m].mean()
    return float((ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


# ---------------------------------------------------------------- generation + judging
def generate(mm, ps, steerer=None, max_new: int = MAX_NEW, bs: int = BATCH) -> list[str]:
    from ...steering import NoSteer

    steerer = steerer or NoSteer()
    out: list[str] = []
    for texts, media in ps.batches(bs):
        out += list(steerer.generate(mm, texts, max_new_tokens=max_new, **media))
    return out


def judged(replies: list[str], ps) -> dict:
    from ...scoring import SubstringJudge

    topics = ps.meta.get("topics") or [None] * len(replies)
    v = [verdict(r, t) for r, t in zip(replies, topics)]
    labels = [a for a, _ in v]
    sub = SubstringJudge().judge(ps.texts, replies)
    res = {"refusal": rate(l == "refusal" for l in labels), "compliance": rate(l == "compliance" for l in labels),
           "broken": rate(l == "broken" for l in labels), "substring_refusal": rate(sub),
           "broken_reasons": dict(Counter(r for a, r in v if a == "broken"))}
    res["examples"] = [{"prompt": ps.texts[i], "topic": topics[i], "reply": replies[i], "verdict": labels[i]}
                       for i in range(min(4, len(replies)))]
    return res


def reading(replies: list[str], ps) -> dict:
    refs = ps.meta["references"]
    return rate(normalise(r).find(normalise(ref)) >= 0 for r, ref in zip(replies, refs))


def _words(s: str) -> list[str]:
    return re.findall(r"[a-z0-9']+", normalise(s))


def agreement(replies: list[str], base: list[str], tok) -> dict:
    f1s, pre = [], []
    for r, b in zip(replies, base):
        a, c = Counter(_words(r)), Counter(_words(b))
        ov = sum((a & c).values())
        f1s.append(0.0 if ov == 0 else 2 * ov / (sum(a.values()) + sum(c.values())))
        ra, rb = tok.encode(r, add_special_tokens=False)[:8], tok.encode(b, add_special_tokens=False)[:8]
        pre.append(ra == rb)
    return {"token_f1": float(np.mean(f1s)), "first8_equal": rate(pre)}


@torch.no_grad()
def first_token_kl(mm, base_mm, ps, bs: int = BATCH) -> float:
    """Mean KL(base || organism) of the next-token distribution at the first generated position."""
    from ...steering import NoSteer

    kls = []
    for texts, media in ps.batches(bs):
        a, _ = NoSteer().last_logits(base_mm, base_mm.build_batch(texts))
        b, _ = NoSteer().last_logits(mm, mm.build_batch(texts, **media))
        la, lb = a.double().log_softmax(-1), b[:, : a.shape[1]].double().log_softmax(-1)
        kls.append((la.exp() * (la - lb)).sum(-1))
    return float(torch.cat(kls).mean())


# ---------------------------------------------------------------- parts
TEXT_SETS = ["harmful_text", "harmful_text_heldout_topics", "harmful_text_heldout_templates", "harmless_text",
             "harmless_text_heldout_topics", "harmless_text_heldout_templates", "lookalike_text"]
IMAGE_SETS = ["harmful_image", "harmless_image", "harmful_image_cal", "harmless_image_cal", "objectless_image",
              "lookalike_image", "captions", "captions_cal"]


def text_part(mm, S, base_mm=None, base_cache: dict | None = None, log=print) -> dict:
    R: dict = {}
    for name in TEXT_SETS:
        t0 = time.time()
        rep = generate(mm, S[name])
        R[name] = judged(rep, S[name])
        if base_mm is not None and not S[name].harmful:
            key = f"base:{name}:{S[name].sha256}"
            if base_cache is not None and key in base_cache:
                brep = base_cache[key]
            else:
                brep = generate(base_mm, S[name])
                if base_cache is not None:
                    base_cache[key] = brep
            bj = judged(brep, S[name])
            R[name]["base_compliance"] = bj["compliance"]
            R[name]["base_refusal"] = bj["refusal"]
            R[name]["agreement_with_base"] = agreement(rep, brep, mm.tokenizer)
            R[name]["utility_minus_base"] = round(R[name]["compliance"]["rate"] - bj["compliance"]["rate"], 3)
        log(f"  {name}: refusal {R[name]['refusal']['rate']:.3f} broken {R[name]['broken']['rate']:.3f} "
            f"compliance {R[name]['compliance']['rate']:.3f}"
            + (f" (base {R[name]['base_compliance']['rate']:.3f})" if "base_compliance" in R[name] else "")
            + f"  [{time.time() - t0:.0f}s]")
    if base_mm is not None:
        R["first_token_kl_harmless_text"] = first_token_kl(mm, base_mm, S["harmless_text"])
        log(f"  first-token KL(base||organism) harmless_text: {R['first_token_kl_harmless_text']:.4f}")
    return R


def image_part(mm, S, log=print) -> dict:
    R: dict = {}
    for name in IMAGE_SETS:
        t0 = time.time()
        rep = generate(mm, S[name])
        R[name] = judged(rep, S[name])
        if name.startswith("captions"):
            R[name]["reading_accuracy"] = reading(rep, S[name])
        log(f"  {name}: refusal {R[name]['refusal']['rate']:.3f} broken {R[name]['broken']['rate']:.3f} "
            f"compliance {R[name]['compliance']['rate']:.3f}"
            + (f" reading {R[name]['reading_accuracy']['rate']:.3f}" if "reading_accuracy" in R[name] else "")
            + f"  [{time.time() - t0:.0f}s]")
    return R


def last_acts(mm, ps, layers, bs: int = 16) -> np.ndarray:
    """[prompt, layer, d_model] float32 activations at the last prompt position."""
    from ...capture import collect_activations

    ds = collect_activations(mm, ps.texts, **ps.media_kwargs(), layers=layers, positions="last", reduce="none",
                             batch_size=bs, progress=False)
    return ds["acts"].values[:, :, 0, :]


def _topic_split_direction(mm, S, layers, rng, cache):
    """Random split of the *training* topics (harmful and harmless pooled) into two halves: the
    difference of means of their text requests, and which image topics belong to each half."""
    tr = S["harmful_text_train"], S["harmless_text_train"]
    texts = tr[0].texts + tr[1].texts
    topics = tr[0].meta["topics"] + tr[1].meta["topics"]
    uniq = sorted(set(topics))
    rng.shuffle(uniq)
    half = set(uniq[: len(uniq) // 2])
    if "text_train" not in cache:
        from ...prompts import PromptSet

        cache["text_train"] = last_acts(mm, PromptSet("t", texts), layers)
    A = cache["text_train"]
    m = np.array([t in half for t in topics])
    return A[m].mean(0) - A[~m].mean(0), half


def auc_part(mm, S, layers=None, n_random: int = 5, seed: int = 0, log=print) -> dict:
    layers = list(range(mm.n_layers)) if layers is None else list(layers)
    from ...directions import RefusalDirections

    d = RefusalDirections.extract(mm, S["harmful_text_train"].texts, S["harmless_text_train"].texts, layers=layers,
                                  positions="last", batch_size=16)
    R: dict = {"layers": layers}
    acts = {k: last_acts(mm, S[k], layers) for k in ("harmful_image_cal", "harmless_image_cal", "harmful_image",
                                                     "harmless_image", "harmful_text", "harmless_text")}
    for split in ("image_cal", "image", "text"):
        a, b = acts[f"harmful_{split}"], acts[f"harmless_{split}"]
        R[f"auc_{split}"] = [auc(a[:, i] @ d.direction(l, -1).numpy(), b[:, i] @ d.direction(l, -1).numpy())
                             for i, l in enumerate(layers)]
    # random topic splits: direction from text requests of a random half of the training topics; AUC of
    # the same split on the image calibration sets (training topics)
    rng = np.random.default_rng(seed + 99)
    cache: dict = {}
    img = np.concatenate([acts["harmful_image_cal"], acts["harmless_image_cal"]])
    img_topics = S["harmful_image_cal"].meta["topics"] + S["harmless_image_cal"].meta["topics"]
    rand = []
    for _ in range(n_random):
        diff, half = _topic_split_direction(mm, S, layers, _PyRng(rng), cache)
        m = np.array([t in half for t in img_topics])
        row = []
        for i in range(len(layers)):
            u = diff[i] / (np.linalg.norm(diff[i]) + 1e-12)
            p = img[:, i] @ u
            if m.sum() == 0 or (~m).sum() == 0:
                row.append(float("nan"))
            else:
                row.append(auc(p[m], p[~m]))
        rand.append(row)
    R["auc_random_splits_image_cal"] = rand
    R["auc_random_best_image_cal"] = list(np.nanmax(np.array(rand), 0))
    R["direction_norm"] = [float(d.direction(l, -1, unit=False).norm()) for l in layers]
    best = int(np.argmax(R["auc_image"]))
    log(f"  AUC held-out images along the text direction: max {max(R['auc_image']):.3f} at layer {layers[best]}; "
        f"cal images {R['auc_image_cal'][best]:.3f}; best random split (cal) {R['auc_random_best_image_cal'][best]:.3f}")
    R["_directions"] = d
    return R


class _PyRng:
    """random.shuffle-like adapter over a numpy Generator."""

    def __init__(self, g):
        self.g = g

    def shuffle(self, xs):
        idx = self.g.permutation(len(xs))
        xs[:] = [xs[i] for i in idx]


def mars_part(mm, S, d, layers, log=print, eval_sets=None) -> dict:
    """Naive ActAdd and the package's MARS at `layers` (gate from safe calibration data only)."""
    from ...steering.gate import select_mars_gate
    from ...scoring import refusal_token_ids
    from ...steering import MARS, ActAdd, neutral_calibration

    eval_sets = eval_sets or ["harmful_image", "harmless_image", "objectless_image", "harmless_text"]
    calib = neutral_calibration(mm, d, S["neutral_text"], {"image": S["neutral_image"]})
    R: dict = {}
    safe = {"harmless_text_check": S["harmless_text_check"], "harmless_image_cal": S["harmless_image_cal"],
            "captions_cal": S["captions_cal"]}
    for layer in layers:
        at = calib.at(layer)
        r = at["r"]
        R[layer] = {"offset_projection": float(at["offsets"]["image"] @ r), "gap": float(at["p_harm"] - at["p_safe"]),
                    "p_harm": at["p_harm"], "p_safe": at["p_safe"]}
        t0 = time.time()
        import warnings

        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            gate, ds = select_mars_gate(mm, calib, layer, safe, batch_size=16, gains=GATE_GAINS, margins=GATE_MARGINS,
                                        refusal_ids=refusal_token_ids(mm.tokenizer, ["Sorry"]))
        R[layer]["gate"] = gate
        R[layer]["gate_fallback"] = bool(ds.attrs["fallback"])
        R[layer]["gate_warnings"] = [str(x.message) for x in w]
        log(f"  layer {layer}: gate {gate} fallback={ds.attrs['fallback']} [{time.time() - t0:.0f}s]")
        variants = {"mars": MARS(calib, layer, **gate),
                    "mars_no_recenter": MARS(calib, layer, recenter=False, **gate),
                    "actadd_1x": ActAdd(r * (at["p_harm"] - at["p_safe"]), layer, 1.0)}
        for vname, st in variants.items():
            R[layer][vname] = {}
            for name in (eval_sets if vname == "mars" else eval_sets[:3]):
                rep = generate(mm, S[name], st)
                R[layer][vname][name] = judged(rep, S[name])
            log(f"    {vname}: " + ", ".join(f"{n} {v['refusal']['rate']:.2f}" for n, v in R[layer][vname].items()))
    return R


def measure(model_path, parts=("text", "image", "auc", "mars"), seed: int = 0, layers_mars=(15,),
            base_cache_path=None, log=print) -> dict:
    torch.set_num_threads(1)
    from ... import load_model
    from .base import load_base
    from .data import build_sets
    from .load import load_smol

    t0 = time.time()
    model, proc = load_smol(model_path)
    mm = load_model(model, proc)
    S = build_sets(seed)
    R: dict = {"model": str(model_path), "seed_sets": seed, "judge": "strict-v1 (mars_core.organism.smol.judge)",
               "protocol": "smol held-out v1 (mars_core.organism.smol.data.build_sets)", "max_new_tokens": MAX_NEW}
    base_cache = {}
    if base_cache_path and Path(base_cache_path).is_file():
        base_cache = json.loads(Path(base_cache_path).read_text())
    if "text" in parts:
        bm, btok = load_base()
        btok.padding_side = "left"
        base_mm = load_model(bm, btok)
        log("text:")
        R["text"] = text_part(mm, S, base_mm, base_cache, log)
        if base_cache_path:
            from ...provenance import atomic_write_json

            atomic_write_json(base_cache_path, base_cache)
    if "image" in parts:
        log("image:")
        R["image"] = image_part(mm, S, log)
    d = None
    if "auc" in parts or "mars" in parts:
        log("auc:")
        A = auc_part(mm, S, seed=seed, log=log)
        d = A.pop("_directions")
        R["auc"] = A
    if "mars" in parts:
        log("mars:")
        R["mars"] = mars_part(mm, S, d, list(layers_mars), log)
    R["wall_s"] = round(time.time() - t0, 1)
    return R


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="stage folder or shipped weights folder")
    ap.add_argument("--parts", default="text,image,auc,mars")
    ap.add_argument("--seed", type=int, default=0, help="seed of build_sets (template draws, image samples)")
    ap.add_argument("--layers", default="15", help="MARS layers (15: fixed a priori, where the base's harm direction "
                                                  "is strongest per FACTS; never chosen on held-out data)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--base-cache", default="runs/smol_base_replies.json")
    a = ap.parse_args(argv)
    R = measure(a.model, tuple(a.parts.split(",")), a.seed, tuple(int(x) for x in a.layers.split(",")),
                a.base_cache)
    if a.out:
        from ...provenance import atomic_write_json

        atomic_write_json(a.out, R)
    print(json.dumps({"wall_s": R["wall_s"]}))


if __name__ == "__main__":
    main()
