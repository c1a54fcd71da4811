"""Neutral inputs for re-centering, generated (never downloaded), as `PromptSet`s.

MARS re-centers image/video activations by the modality offset o_m = mean(neutral m inputs) -
mean(the same requests as text only) (`mars_core.steering.calibration.calibrate`). The neutral
media are object-less: images `[side, side, 3]` uint8 (even positions a random solid colour, odd
uniform noise) and videos `[frames, side, side, 3]` uint8 (even positions one blank colour, odd
independent noise frames), at the model's resolution (`media_side`), each paired with a benign
generic request; the text baseline uses the same requests without media:

    text, media = neutral_sets(mm, ["image", "video"], n=8, seed=0)
    calib = calibrate(mm, dirs, text, media)
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

from ..errors import InputError
from ..prompts import PromptSet
from ..provenance import make_provenance, sha256_text

NEUTRAL_REQUESTS: dict[str, tuple[str, ...]] = {
    "image": (
        "Describe this image.",
        "What do you see in this picture?",
        "Give a short caption for this image.",
        "What colours are in this image?",
    ),
    "video": (
        "Describe this video.",
        "What happens in this video?",
        "Give a short caption for this video.",
        "What colours are in this video?",
    ),
}
"""Benign generic requests paired with neutral media, per modality."""

GENERIC_REQUESTS = (
    "Describe what you see.",
    "What is shown here?",
    "Give a short caption.",
    "What colours do you see?",
)
"""Requests that name no modality, used when one text baseline serves image and video sets."""


def _get(d: Any, k: str):
    if d is None:
        return None
    return d.get(k) if isinstance(d, dict) else getattr(d, k, None)


def _processor_side(ip: Any) -> int | None:
    """Square side (px) an image/video processor resizes to: crop_size, else size height/width,
    else size shortest_edge. Qwen-VL style processors (with `merge_size`) give shortest_edge as a
    pixel COUNT (min_pixels): the side is its square root."""
    crop = getattr(ip, "crop_size", None)
    if _get(crop, "height") and _get(crop, "width"):
        return int(_get(crop, "height"))
    size = getattr(ip, "size", None)
    if _get(size, "height") and _get(size, "width"):
        return int(_get(size, "height"))
    se = _get(size, "shortest_edge")
    if se:
        if getattr(ip, "merge_size", None) is not None:
            return int(math.ceil(math.sqrt(int(se))))
        return int(se)
    return None


def media_side(mm: Any, modality: str = "image", size: int | None = None, *, default: int | None = None) -> int:
    """Square side (px) of neutral media for `mm` (a MarsModel or a processor): `size` if given,
    else read from the model's video processor (for "video", when it has one) or image processor,
    else `default`; InputError when none of these gives a side."""
    if size is not None:
        if int(size) < 1:
            raise InputError(f"size={size}; must be >= 1 px")
        return int(size)
    proc = mm if (hasattr(mm, "image_processor") or hasattr(mm, "video_processor")) else getattr(mm, "processor", None)
    sub = getattr(proc, "video_processor", None) if modality == "video" else None
    sub = sub or getattr(proc, "image_processor", None)
    side = _processor_side(sub) if sub is not None else None
    if side is not None:
        return side
    if default is not None:
        return int(default)
    raise InputError("cannot read an image resolution from this model or processor; give size= (px)")


def neutral_images(n: int, size: int, seed: int = 0) -> list[np.ndarray]:
    """n neutral images [size, size, 3] uint8: even indices a random solid colour, odd uniform noise."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        if i % 2 == 0:
            img = np.broadcast_to(rng.integers(0, 256, size=(1, 1, 3), dtype=np.uint8), (size, size, 3)).copy()
        else:
            img = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
        out.append(img)
    return out


def neutral_videos(n: int, size: int, frames: int = 4, seed: int = 0) -> list[np.ndarray]:
    """n neutral videos [frames, size, size, 3] uint8: even indices blank (one random colour),
    odd independent uniform-noise frames."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        if i % 2 == 0:
            c = rng.integers(0, 256, size=(1, 1, 1, 3), dtype=np.uint8)
            out.append(np.broadcast_to(c, (frames, size, size, 3)).copy())
        else:
            out.append(rng.integers(0, 256, size=(frames, size, size, 3), dtype=np.uint8))
    return out


def _texts(n: int, requests: Sequence[str]) -> list[str]:
    if n < 1:
        raise InputError(f"n={n}; a neutral set needs at least one prompt")
    reqs = list(requests)
    if not reqs or any(not isinstance(r, str) or not r.strip() for r in reqs):
        raise InputError("requests must be non-empty strings")
    return [reqs[i % len(reqs)] for i in range(n)]


def neutral_image_set(mm: Any = None, n: int = 8, *, seed: int = 0, size: int | None = None,
                      requests: Sequence[str] | None = None, name: str = "neutral_image") -> PromptSet:
    """n benign requests, each with a neutral image [side, side, 3] uint8 (solid colour / noise)."""
    side = media_side(mm, "image", size)
    texts = _texts(n, NEUTRAL_REQUESTS["image"] if requests is None else requests)
    return PromptSet(name, texts, images=neutral_images(n, side, seed), harmful=None, meta={
        "kinds": ["colour" if i % 2 == 0 else "noise" for i in range(n)],
        "provenance": make_provenance(kind="neutral", modality="image", seed=seed, size=side, n=n,
                                      texts_sha256=sha256_text(texts), generator="mars_core.steering.neutral_images"),
    })


def neutral_video_set(mm: Any = None, n: int = 8, *, seed: int = 0, size: int | None = None, frames: int = 4,
                      requests: Sequence[str] | None = None, name: str = "neutral_video") -> PromptSet:
    """n benign requests, each with a neutral video [frames, side, side, 3] uint8 (blank / noise)."""
    if frames < 1:
        raise InputError(f"frames={frames}; must be >= 1")
    side = media_side(mm, "video", size)
    texts = _texts(n, NEUTRAL_REQUESTS["video"] if requests is None else requests)
    return PromptSet(name, texts, videos=neutral_videos(n, side, frames, seed), harmful=None, meta={
        "kinds": ["blank" if i % 2 == 0 else "noise" for i in range(n)],
        "provenance": make_provenance(kind="neutral", modality="video", seed=seed, size=side, n=n, frames=frames,
                                      texts_sha256=sha256_text(texts), generator="mars_core.steering.neutral_videos"),
    })


def neutral_text_set(n: int = 8, *, requests: Sequence[str] | None = None, modality: str = "image",
                     name: str = "neutral_text") -> PromptSet:
    """The text-only baseline: the same benign requests without media (default: those of `modality`)."""
    if requests is None:
        if modality not in NEUTRAL_REQUESTS:
            raise InputError(f"modality={modality!r}; use one of {sorted(NEUTRAL_REQUESTS)} or give requests")
        requests = NEUTRAL_REQUESTS[modality]
    texts = _texts(n, requests)
    return PromptSet(name, texts, harmful=None, meta={
        "provenance": make_provenance(kind="neutral", modality="text", n=n, texts_sha256=sha256_text(texts)),
    })


def neutral_sets(mm: Any = None, modalities: Sequence[str] = ("image",), n: int = 8, *, seed: int = 0,
                 size: int | None = None, frames: int = 4,
                 requests: Sequence[str] | None = None) -> tuple[PromptSet, dict[str, PromptSet]]:
    """(text baseline, {modality: neutral media set}) for `calibrate`.

    Every set uses the same requests, so each offset isolates the media tokens: `requests` if
    given, else that modality's `NEUTRAL_REQUESTS` for a single modality, else `GENERIC_REQUESTS`.
    Each modality's media are drawn with `seed`.
    """
    mods = list(modalities)
    bad = [m for m in mods if m not in ("image", "video")]
    if not mods or bad:
        raise InputError(f"modalities={mods}; give one or more of 'image', 'video'")
    if requests is None:
        requests = NEUTRAL_REQUESTS[mods[0]] if len(mods) == 1 else GENERIC_REQUESTS
    media = {}
    for m in mods:
        if m == "image":
            media[m] = neutral_image_set(mm, n, seed=seed, size=size, requests=requests)
        else:
            media[m] = neutral_video_set(mm, n, seed=seed, size=size, frames=frames, requests=requests)
    return neutral_text_set(n, requests=requests), media
