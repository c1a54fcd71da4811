"""Prompt suites: every `PromptSet` the paper's analyses need, for one model.

The toy organism's suite is `mars_core.organism.sets.organism_suite` (its own vocabulary and
glyph images); `typographic_suite` is a data-free suite for any hub model. Names:

- `harmful_text_train` / `harmless_text_train`: text requests the directions are taken from;
- `harmful_text` / `harmless_text`: held-out text requests (evaluation);
- `harmful_image_cal` / `harmless_image_cal`: image requests used only to measure how the
  image-side difference of means aligns with the text direction (never used to steer);
- `harmful_image` / `harmless_image`: held-out image requests (evaluation);
- `captions` (and `captions_cal`, trained templates with a separate image stream, for fitting the MARS gate): harmless-concept caption requests, with `meta["concepts"]` for the utility check;
- `neutral_text` / `neutral_image`: benign generic requests without / with neutral images
  (solid colour, noise, blank), for re-centering.
Video sets appear only for models that take video.
"""

from __future__ import annotations

import numpy as np

from mars_core.organism.sets import caption_check, organism_suite
from mars_core.prompts import PromptSet

__all__ = ["caption_check", "organism_suite", "typographic_image", "typographic_suite"]


def _clean(s: str) -> str:
    """Organism templates space their punctuation ("a bomb ?"); real models want "a bomb?"."""
    return s.replace(" ?", "?").replace(" .", ".")


def typographic_image(word: str, size: int, seed: int) -> np.ndarray:
    """A `[size, size, 3]` uint8 image with `word` written in dark ink on a light background
    (the typographic visual prompts of FigStep-style attacks), with a seeded jitter."""
    from PIL import Image, ImageDraw, ImageFont

    rng = np.random.default_rng(seed)
    bg = tuple(int(v) for v in rng.integers(215, 256, 3))
    img = Image.new("RGB", (size, size), bg)
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default(size=max(8, size // max(4, len(word) - 1)))
    box = draw.textbbox((0, 0), word, font=font)
    w, h = box[2] - box[0], box[3] - box[1]
    x = (size - w) / 2 + rng.integers(-size // 16, size // 16 + 1) - box[0]
    y = (size - h) / 2 + rng.integers(-size // 16, size // 16 + 1) - box[1]
    draw.text((x, y), word, fill=tuple(int(v) for v in rng.integers(0, 60, 3)), font=font)
    return np.asarray(img)


def typographic_suite(seed: int = 0, image_size: int = 336) -> dict[str, PromptSet]:
    """A data-free suite for any hub model: the organism's concepts and request templates in
    plain English, with the concept word rendered as a typographic image for image requests.

    Real benchmarks (MM-SafetyBench, FigStep, VLGuard, ...) give stronger evidence; this suite
    needs no download and exercises every analysis.
    """
    from mars_core.organism import concepts as C
    from mars_core.steering.neutral import neutral_images

    def text_set(name, combos, words, harmful):
        texts, cs = [], []
        for x in words:
            for c in combos:
                texts.append(_clean(C.direct_request(c, x)))
                cs.append(x)
        return PromptSet(name, texts, harmful=harmful, meta={"concepts": cs})

    def image_set(name, combos, words, harmful, stream):
        texts, ims, cs = [], [], []
        for i, x in enumerate(words):
            for j, c in enumerate(combos):
                texts.append(_clean(C.image_request(c)).replace(" it?", " the thing written in this image?"))
                ims.append(typographic_image(x, image_size, seed * 100_003 + stream * 1_009 + i * 31 + j))
                cs.append(x)
        return PromptSet(name, texts, images=ims, harmful=harmful, meta={"concepts": cs})

    tr, ho = C.TRAIN_COMBOS, C.HELDOUT_COMBOS[:6]
    suite = {
        "harmful_text_train": text_set("harmful_text_train", tr, C.HARMFUL, True),
        "harmless_text_train": text_set("harmless_text_train", tr, C.HARMLESS, False),
        "harmful_text": text_set("harmful_text", ho, C.HARMFUL, True),
        "harmless_text": text_set("harmless_text", ho, C.HARMLESS, False),
        "harmful_image_cal": image_set("harmful_image_cal", tr[:4], C.HARMFUL, True, 1),
        "harmless_image_cal": image_set("harmless_image_cal", tr[:4], C.HARMLESS, False, 2),
        "harmful_image": image_set("harmful_image", ho[:2], C.HARMFUL, True, 3),
        "harmless_image": image_set("harmless_image", ho[:2], C.HARMLESS, False, 4),
    }
    caps = [typographic_image(x, image_size, seed * 7 + 5_000 + i) for i, x in enumerate(C.HARMLESS)]
    suite["captions"] = PromptSet("captions", ["What word is written in this image?"] * len(caps),
                                  images=caps, harmful=False, meta={"concepts": list(C.HARMLESS)})
    reqs = ["Describe this image.", "What do you see in this picture?", "Give a short caption for this image."]
    n = 24
    suite["neutral_text"] = PromptSet("neutral_text", [reqs[i % 3] for i in range(n)])
    suite["neutral_image"] = PromptSet("neutral_image", [reqs[i % 3] for i in range(n)],
                                       images=neutral_images(n, image_size, seed=seed + 17))
    return suite
