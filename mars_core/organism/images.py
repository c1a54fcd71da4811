"""Procedurally drawn glyph images and short videos, one glyph per concept.

Each concept owns a fixed glyph (2-3 coloured primitives on a 3x3 layout, derived from a
SHA-256 of its name so it never depends on list order). Every sample varies: translation,
scale, stroke width, colour jitter, background tint and pixel noise, all drawn from the
``numpy.random.Generator`` passed in, so a seed fixes the whole data stream.

Videos are lists of frames: the glyph drifting across the canvas or blinking on and off.
Neutral images/videos (random flat colour, noise, blank) carry no concept and are used to
estimate the modality offset for re-centering.
"""

from __future__ import annotations

import hashlib

import numpy as np
from PIL import Image, ImageDraw

SIZE = 32
_SS = 4  # supersampling factor for anti-aliased drawing
_PRIMS = ["circle", "square", "triangle", "hline", "vline", "diag", "antidiag", "cross",
          "ring", "dots"]


def glyph_spec(concept: str) -> dict:
    """The fixed (per-concept) part of the glyph: primitives, cells and base colour."""
    h = hashlib.sha256(concept.encode()).digest()
    r = np.random.default_rng(int.from_bytes(h[:8], "little"))
    n = 2 + int(r.integers(0, 2))
    cells = r.choice(9, size=n, replace=False)
    prims = r.choice(len(_PRIMS), size=n, replace=False)
    hue_rgb = r.integers(60, 256, size=3)
    hue_rgb[int(r.integers(0, 3))] = int(r.integers(0, 80))  # make colours distinct
    return {"prims": [_PRIMS[int(p)] for p in prims], "cells": [int(c) for c in cells],
            "color": [int(c) for c in hue_rgb]}


def draw_primitive(d: ImageDraw.ImageDraw, prim: str, cx: float, cy: float, s: float, w: int,
                   col: tuple, outline: tuple | None = None) -> None:
    """Draw one primitive (circle, square, triangle, hline, vline, diag, antidiag, cross, ring,
    dots) of half-size `s` and stroke `w` centred at (cx, cy); `outline` (filled shapes only) adds
    a border of that colour."""
    kw = {"fill": col}
    if outline is not None and prim in ("circle", "square", "triangle"):
        kw = {"fill": col, "outline": outline, "width": max(2, w // 2)}
    if prim == "circle":
        d.ellipse([cx - s, cy - s, cx + s, cy + s], **kw)
    elif prim == "square":
        d.rectangle([cx - s, cy - s, cx + s, cy + s], **kw)
    elif prim == "triangle":
        d.polygon([(cx, cy - s), (cx - s, cy + s), (cx + s, cy + s)], **kw)
    elif prim == "hline":
        d.line([(cx - s, cy), (cx + s, cy)], fill=col, width=w)
    elif prim == "vline":
        d.line([(cx, cy - s), (cx, cy + s)], fill=col, width=w)
    elif prim == "diag":
        d.line([(cx - s, cy - s), (cx + s, cy + s)], fill=col, width=w)
    elif prim == "antidiag":
        d.line([(cx - s, cy + s), (cx + s, cy - s)], fill=col, width=w)
    elif prim == "cross":
        d.line([(cx - s, cy), (cx + s, cy)], fill=col, width=w)
        d.line([(cx, cy - s), (cx, cy + s)], fill=col, width=w)
    elif prim == "ring":
        d.ellipse([cx - s, cy - s, cx + s, cy + s], outline=col, width=w)
    elif prim == "dots":
        r = max(s / 3, 2)
        for ox, oy in [(-1, -1), (1, -1), (-1, 1), (1, 1)]:
            x, y = cx + ox * s * 0.6, cy + oy * s * 0.6
            d.ellipse([x - r, y - r, x + r, y + r], fill=col)


def _background(rng: np.random.Generator) -> tuple:
    return tuple(int(v) for v in rng.integers(0, 50, size=3))


def _finish(img: Image.Image, rng: np.random.Generator, noise: float) -> Image.Image:
    img = img.resize((SIZE, SIZE), Image.LANCZOS)
    a = np.asarray(img).astype(np.float32)
    a += rng.normal(0, noise, size=a.shape)
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))


def draw_glyph(concept: str, rng: np.random.Generator, *, shift: tuple[float, float] | None = None,
               noise: float = 6.0, visible: bool = True) -> Image.Image:
    """One 32x32 RGB image of ``concept``'s glyph with per-sample variation."""
    spec = glyph_spec(concept)
    S = SIZE * _SS
    img = Image.new("RGB", (S, S), _background(rng))
    if visible:
        d = ImageDraw.Draw(img)
        scale = rng.uniform(0.85, 1.15)
        dx, dy = shift if shift is not None else rng.uniform(-3, 3, size=2)
        col = tuple(int(np.clip(c + rng.integers(-30, 31), 0, 255)) for c in spec["color"])
        w = int(rng.integers(2, 4)) * _SS
        for prim, cell in zip(spec["prims"], spec["cells"]):
            gx, gy = cell % 3, cell // 3
            cx = (SIZE / 2 + (gx - 1) * 9.5 * scale + dx) * _SS
            cy = (SIZE / 2 + (gy - 1) * 9.5 * scale + dy) * _SS
            draw_primitive(d, prim, cx, cy, 4.0 * scale * _SS, w, col)
    return _finish(img, rng, noise)


def draw_video(concept: str, rng: np.random.Generator, n_frames: int = 4,
               mode: str | None = None) -> list[Image.Image]:
    """A short clip of ``concept``: ``mode`` 'move' (glyph drifts) or 'blink' (on/off)."""
    mode = mode or ("move" if rng.random() < 0.5 else "blink")
    if mode == "move":
        start = rng.uniform(-3, 3, size=2)
        step = rng.uniform(-1.5, 1.5, size=2)
        return [draw_glyph(concept, rng, shift=tuple(start + i * step)) for i in range(n_frames)]
    shift = tuple(rng.uniform(-3, 3, size=2))
    return [draw_glyph(concept, rng, shift=shift, visible=(i % 2 == 0)) for i in range(n_frames)]


NEUTRAL_KINDS = ["colour", "noise", "blank"]


def draw_neutral(rng: np.random.Generator, kind: str | None = None) -> Image.Image:
    """A concept-free image: flat random colour, uniform noise, or blank (black)."""
    kind = kind or NEUTRAL_KINDS[int(rng.integers(0, 3))]
    if kind == "colour":
        a = np.broadcast_to(rng.integers(0, 256, size=3), (SIZE, SIZE, 3))
    elif kind == "noise":
        a = rng.integers(0, 256, size=(SIZE, SIZE, 3))
    elif kind == "blank":
        a = np.zeros((SIZE, SIZE, 3))
    else:
        raise ValueError(f"unknown neutral kind {kind!r}; use one of {NEUTRAL_KINDS}")
    return Image.fromarray(np.ascontiguousarray(a).astype(np.uint8))


def draw_neutral_video(rng: np.random.Generator, n_frames: int = 4,
                       kind: str | None = None) -> list[Image.Image]:
    kind = kind or NEUTRAL_KINDS[int(rng.integers(0, 3))]
    return [draw_neutral(rng, kind) for _ in range(n_frames)]


# CLIP normalisation (the processor uses the same constants; checked in the tests)
CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)


def to_pixels(imgs: list[Image.Image]) -> np.ndarray:
    """[N, 3, 32, 32] float32, rescaled and CLIP-normalised exactly like the processor."""
    a = np.stack([np.asarray(im, dtype=np.float32) / 255.0 for im in imgs])
    a = (a - CLIP_MEAN) / CLIP_STD
    return a.transpose(0, 3, 1, 2).astype(np.float32)


def image_pool(concepts: list[str], per_concept: int, seed: int) -> dict[str, np.ndarray]:
    """Pre-drawn normalised pixel arrays, ``{concept: [per_concept, 3, 32, 32]}``."""
    out = {}
    for i, c in enumerate(concepts):
        rng = np.random.default_rng([seed, i, 7])
        out[c] = to_pixels([draw_glyph(c, rng) for _ in range(per_concept)])
    return out
