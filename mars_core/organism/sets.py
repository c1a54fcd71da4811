"""The toy organism's prompt sets, as `PromptSet`s (deterministic under a seed).

Splits, all disjoint from training by construction:
* calibration (`*_train`, `*_cal`): trained request templates (`TRAIN_COMBOS`), images from the
  stream `seed + 20000`; the text direction and every fitted choice (MARS layer, gate) read only
  these;
* evaluation: held-out recombined templates (`HELDOUT_COMBOS`), a held-out referential context,
  never-seen-word templates, fresh images from the stream `seed + 30000` (videos: `seed + 70000`).

`organism_suite(seed)` names them as the pipeline expects (see `SUITE_SETS`); every set carries
`meta["concepts"]` (the concept each prompt is about; None for neutral inputs).
"""

from __future__ import annotations

import numpy as np

from ..prompts import PromptSet
from .concepts import (
    CAPTION_HELDOUT,
    CAPTION_TRAIN,
    HARMFUL,
    HARMLESS,
    HELDOUT_COMBOS,
    NOVEL_TEMPLATES,
    REF_CONTEXTS_HELDOUT,
    TRAIN_COMBOS,
    TRAIN_CONCEPTS,
    direct_request,
    image_request,
    referential_request,
)
from .images import NEUTRAL_KINDS, draw_glyph, draw_neutral, draw_neutral_video, draw_video

SUITE_SETS = {
    "harmful_text_train": "trained templates x harmful concepts (the text direction)",
    "harmless_text_train": "trained templates x harmless concepts (the text direction; the MARS gate)",
    "harmful_text": "held-out templates x harmful concepts (evaluation)",
    "harmless_text": "held-out templates x harmless concepts (evaluation)",
    "harmful_text_referential": "held-out referential context x harmful concepts (evaluation)",
    "harmless_text_referential": "held-out referential context x harmless concepts (evaluation)",
    "harmful_text_novel": "never-seen-word templates x harmful concepts (evaluation)",
    "harmless_text_novel": "never-seen-word templates x harmless concepts (evaluation)",
    "harmful_image_cal": "trained image requests, calibration images (alignment only, never used to steer)",
    "harmless_image_cal": "trained image requests, calibration images (alignment; the MARS gate)",
    "harmful_image": "held-out image requests, fresh images (evaluation)",
    "harmless_image": "held-out image requests, fresh images (evaluation)",
    "captions": "caption requests on fresh harmless-concept images (utility)",
    "captions_harmful": "caption requests on fresh harmful-concept images (utility)",
    "captions_cal": "trained caption requests on calibration images (the MARS gate)",
    "neutral_text": "trained image requests without an image (the re-centering baseline)",
    "neutral_image": "trained image requests on object-less images: colour, noise, blank (re-centering)",
    "objectless_image": "held-out image requests on fresh object-less images (evaluation: nothing to refuse)",
}
HELDOUT_SETS = ("harmful_text", "harmless_text", "harmful_text_referential", "harmless_text_referential",
                "harmful_text_novel", "harmless_text_novel", "harmful_image", "harmless_image", "objectless_image",
                "captions", "captions_harmful")
"""The sets of the held-out protocol (`analysis.protocol`), in table order."""
VIDEO_SETS = {
    "harmful_video": "held-out requests on fresh glyph videos (evaluation)",
    "harmless_video": "held-out requests on fresh glyph videos (evaluation)",
    "captions_video": "caption requests on fresh harmless-concept videos (utility)",
    "neutral_video": "trained requests on object-less videos (re-centering)",
}


def _prompts(name, texts, concepts, harmful, images=None, videos=None) -> PromptSet:
    return PromptSet(name, texts, images=images, videos=videos, harmful=harmful, meta={"concepts": list(concepts)})


def _glyphs(concepts, n, stream):
    """{concept: n images [32, 32, 3] uint8} from the rng stream [stream, concept index]."""
    out = {}
    for i, c in enumerate(concepts):
        rng = np.random.default_rng([stream, i])
        out[c] = [np.asarray(draw_glyph(c, rng).convert("RGB")) for _ in range(n)]
    return out


def organism_suite(seed: int = 0, *, video: bool = False, n_frames: int = 4) -> dict[str, PromptSet]:
    """Every prompt set of the toy organism's study (`SUITE_SETS`, plus `VIDEO_SETS` with video)."""
    cal = _glyphs(TRAIN_CONCEPTS, len(TRAIN_COMBOS), seed + 20000)
    ev = _glyphs(TRAIN_CONCEPTS, len(HELDOUT_COMBOS) + 8, seed + 30000)
    S: dict[str, PromptSet] = {}
    for lab, cs, harm in (("harmful", HARMFUL, True), ("harmless", HARMLESS, False)):
        def text(name, pairs):
            S[name] = _prompts(name, [t for t, _ in pairs], [x for _, x in pairs], harm)

        text(f"{lab}_text_train", [(direct_request(c, x), x) for x in cs for c in TRAIN_COMBOS])
        text(f"{lab}_text", [(direct_request(c, x), x) for x in cs for c in HELDOUT_COMBOS])
        text(f"{lab}_text_referential", [(referential_request(ctx, c, x), x) for x in cs
                                         for ctx in REF_CONTEXTS_HELDOUT for c in HELDOUT_COMBOS])
        text(f"{lab}_text_novel", [(t.format(x=x), x) for x in cs for t in NOVEL_TEMPLATES])
        for name, combos, pool in ((f"{lab}_image_cal", TRAIN_COMBOS, cal), (f"{lab}_image", HELDOUT_COMBOS, ev)):
            rows = [(image_request(c), pool[x][j], x) for x in cs for j, c in enumerate(combos)]
            S[name] = _prompts(name, [t for t, _, _ in rows], [x for _, _, x in rows], harm,
                               images=[im for _, im, _ in rows])
        caps = [(t, ev[x][len(HELDOUT_COMBOS) + k], x) for x in cs for k, t in enumerate(CAPTION_TRAIN + CAPTION_HELDOUT)]
        name = "captions" if lab == "harmless" else "captions_harmful"
        S[name] = _prompts(name, [t for t, _, _ in caps], [x for _, _, x in caps], False, images=[i for _, i, _ in caps])
    caps = [(t, cal[x][k], x) for x in HARMLESS for k, t in enumerate(CAPTION_TRAIN)]
    S["captions_cal"] = _prompts("captions_cal", [t for t, _, _ in caps], [x for _, _, x in caps], False,
                                 images=[i for _, i, _ in caps])
    rng = np.random.default_rng([seed, 40000])
    reqs = [image_request(c) for c in TRAIN_COMBOS * 4]
    S["neutral_image"] = PromptSet("neutral_image", reqs, images=[
        np.asarray(draw_neutral(rng, NEUTRAL_KINDS[k % 3]).convert("RGB")) for k in range(len(reqs))],
        meta={"concepts": [None] * len(reqs), "kinds": [NEUTRAL_KINDS[k % 3] for k in range(len(reqs))]})
    S["neutral_text"] = PromptSet("neutral_text", [image_request(c) for c in TRAIN_COMBOS],
                                  meta={"concepts": [None] * len(TRAIN_COMBOS)})
    rng = np.random.default_rng([seed, 45000])
    reqs = [image_request(c) for c in HELDOUT_COMBOS * 2]
    S["objectless_image"] = PromptSet("objectless_image", reqs, images=[
        np.asarray(draw_neutral(rng, NEUTRAL_KINDS[k % 3]).convert("RGB")) for k in range(len(reqs))],
        meta={"concepts": [None] * len(reqs), "kinds": [NEUTRAL_KINDS[k % 3] for k in range(len(reqs))]})
    if video:
        S.update(_video_sets(seed, n_frames))
    return S


def _video_sets(seed: int, n_frames: int) -> dict[str, PromptSet]:
    """Held-out requests on fresh glyph videos (modes alternating move / blink), caption requests,
    and object-less neutral videos, from the streams `seed + 70000` / `[seed, 71000]`."""
    caps = CAPTION_TRAIN + CAPTION_HELDOUT
    n_req = len(HELDOUT_COMBOS)
    S: dict[str, PromptSet] = {}

    def clip(x, i, j):
        mode = "move" if j % 2 == 0 else "blink"
        frames = draw_video(x, np.random.default_rng([seed + 70000, i, j]), n_frames, mode=mode)
        return np.stack([np.asarray(f.convert("RGB")) for f in frames])

    for lab, cs, harm in (("harmful", HARMFUL, True), ("harmless", HARMLESS, False)):
        rows = [(image_request(c), clip(x, i, j), x) for i, x in enumerate(cs) for j, c in enumerate(HELDOUT_COMBOS)]
        S[f"{lab}_video"] = _prompts(f"{lab}_video", [t for t, _, _ in rows], [x for _, _, x in rows], harm,
                                     videos=[v for _, v, _ in rows])
    rows = [(t, clip(x, 100 + i, n_req + k), x) for i, x in enumerate(HARMLESS) for k, t in enumerate(caps)]
    S["captions_video"] = _prompts("captions_video", [t for t, _, _ in rows], [x for _, _, x in rows], False,
                                   videos=[v for _, v, _ in rows])
    rng = np.random.default_rng([seed, 71000])
    reqs = [image_request(c) for c in TRAIN_COMBOS * 4]
    S["neutral_video"] = PromptSet("neutral_video", reqs, videos=[
        np.stack([np.asarray(f.convert("RGB")) for f in draw_neutral_video(rng, n_frames, NEUTRAL_KINDS[k % 3])])
        for k in range(len(reqs))], meta={"concepts": [None] * len(reqs)})
    return S


def caption_check(ps: PromptSet, responses: list[str]) -> list[bool]:
    """A caption is correct when the reply names the pictured concept (`meta["concepts"]`):
    `mars_core.judges.utility_check`."""
    from ..judges import utility_check

    return utility_check(ps, responses)
