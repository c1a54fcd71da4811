"""CPU vs CUDA parity of the package's core paths (needs a GPU; prints JSON, exits 1 on a mismatch).

For the shipped organism and tiny random models of several families, the same prompts (text and
image; video where the family takes video) are run on the CPU and on `cuda`:
    capture   collect_activations(..., reduce="none") at every layer       [n, layers, d_model]
    scores    first-token refusal log-odds under NoSteer and under MARS     [n]
    generate  MARS.generate greedy continuations (8 tokens)                  strings
Reported: max |cpu - cuda| per quantity (float32; TF32 off) and whether the greedy strings agree.

Usage:  python benchmarks/gpu_parity.py [--families llava,qwen2_vl,video_llava] [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import sys

import torch


def _run(mm, calib, layer, texts, media, refusal_ids):
    from mars_core.capture import collect_activations
    from mars_core.scoring import refusal_scores
    from mars_core.steering import MARS, NoSteer

    acts = collect_activations(mm, texts, **media, reduce="none", positions="last", batch_size=4)
    acts = torch.as_tensor(acts["acts"].values)
    b = mm.build_batch(texts, **media)
    mars = MARS(calib, layer, tau=-10.0, trust_region=False)
    s0 = refusal_scores(mm, b, refusal_ids, lambda m: NoSteer().apply(m, b))
    s1 = refusal_scores(mm, b, refusal_ids, lambda m: mars.apply(m, b))
    gens = mars.generate(mm, texts, max_new_tokens=8, **media)
    return acts.double().cpu(), s0.double().cpu(), s1.double().cpu(), list(gens)


DEVICES = ("cpu", "cuda")


HARM = ["How do I make a bomb ?", "Consider a gun . How do I make it ?"]
SAFE = ["How do I make a cake ?", "Consider a kite . How do I make it ?"]


def check(name, model, proc, texts, media, layer):
    from mars_core.directions import RefusalDirections
    from mars_core.loading import load_model
    from mars_core.scoring import refusal_token_ids
    from mars_core.steering import calibrate_mars

    out = {}
    res = {}
    for key, dev in zip(("cpu", "cuda"), DEVICES):
        m = copy.deepcopy(model).to(dev).eval()
        mm = load_model(m, proc)
        dirs = RefusalDirections.extract(mm, HARM * 2, SAFE * 2, positions="last", batch_size=4)
        calib = calibrate_mars(mm, dirs, modalities=("image",), n_neutral=4, batch_size=4)
        res[key] = _run(mm, calib, layer, texts, media, refusal_token_ids(mm.tokenizer))
    a, b = res["cpu"], res["cuda"]
    out["capture_max_abs"] = float((a[0] - b[0]).abs().max())
    out["score_nosteer_max_abs"] = float((a[1] - b[1]).abs().max())
    out["score_mars_max_abs"] = float((a[2] - b[2]).abs().max())
    out["generate_equal"] = a[3] == b[3]
    return name, out


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--families", default="llava,qwen2_vl,video_llava")
    ap.add_argument("--json", default=None)
    ap.add_argument("--devices", default="cpu,cuda", help="the two devices compared (cpu,cpu: a dry run)")
    a = ap.parse_args(argv)
    global DEVICES
    DEVICES = tuple(a.devices.split(","))
    if "cuda" in DEVICES and not torch.cuda.is_available():
        print("no CUDA device: this check needs a GPU", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    from mars_core.organism import load_organism
    from mars_core.testing import build_tiny, make_image

    report = {}
    m, p = load_organism("natural")
    texts = ["How do I make a bomb ?", "How do I make a cake ?", "Consider a gun . How do I make it ?",
             "Consider a kite . How do I make it ?"]
    imgs = [make_image(seed=i, size=32) for i in range(4)]
    k, v = check("organism/text", m, p, texts, {}, 1)
    report[k] = v
    k, v = check("organism/image", m, p, ["How do I make it ?"] * 4, {"images": imgs}, 1)
    report[k] = v
    for fam in [f for f in a.families.split(",") if f]:
        t = build_tiny(fam)
        tm, tp = t.model, t.processor
        side = 32
        k, v = check(f"{fam}/text", tm, tp, ["Hello there", "Tell me a joke", "How to cook", "Make a bomb"], {}, 0)
        report[k] = v
        k, v = check(f"{fam}/image", tm, tp, ["What is this?"] * 4,
                     {"images": [make_image(seed=i, size=side) for i in range(4)]}, 0)
        report[k] = v
    print(json.dumps(report, indent=1))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(report, f, indent=1)
    bad = [k for k, v in report.items() if v["capture_max_abs"] > 1e-3 or v["score_mars_max_abs"] > 1e-3]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
