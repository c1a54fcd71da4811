"""Typographic images (FigStep / MM-SafetyBench TYPO style), object-less images, short videos.

Every image is ``SIZE x SIZE`` RGB ``uint8`` (numpy ``[H, W, 3]``), drawn with PIL from TrueType
fonts shipped inside matplotlib (``matplotlib.get_data_path()/fonts/ttf``), so the same fonts
exist on every machine. Each sample varies (drawn from the ``numpy.random.Generator`` given):
font file within the family, size, line wrapping, position, text/background colours, rotation,
pixel noise.

Renderers
---------
Training renderers (stages b and c, and the calibration sets) use ``TRAIN_FONTS`` (DejaVu Sans,
DejaVu Serif, DejaVu Sans Mono, STIX) and ``TRAIN_STYLES``. "Another renderer" for the
held-out sets: the Computer Modern family (``HELDOUT_FONTS``) and/or the ``"outlined"`` style
(outlined letters on a two-colour gradient), never drawn in training.
"""

from __future__ import annotations

import os
import textwrap
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFont

SIZE = 128

_FAMILIES = {
    "dejavu_sans": ["DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSans-Oblique.ttf"],
    "dejavu_serif": ["DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf", "DejaVuSerif-Italic.ttf"],
    "dejavu_mono": ["DejaVuSansMono.ttf", "DejaVuSansMono-Bold.ttf"],
    "stix": ["STIXGeneral.ttf", "STIXGeneralBol.ttf", "STIXGeneralItalic.ttf"],
    "computer_modern": ["cmr10.ttf", "cmss10.ttf", "cmtt10.ttf", "cmb10.ttf"],
}
TRAIN_FONTS = ("dejavu_sans", "dejavu_serif", "dejavu_mono", "stix")
HELDOUT_FONTS = ("computer_modern",)
TRAIN_STYLES = ("plain", "inverse", "colour", "noisy", "rotated")
HELDOUT_STYLES = ("outlined",)
OBJECTLESS_KINDS = ("blank_white", "blank_black", "flat_colour", "uniform_noise", "gaussian_noise", "gradient")


def font_dir() -> str:
    import matplotlib

    return os.path.join(matplotlib.get_data_path(), "fonts", "ttf")


@lru_cache(maxsize=512)
def _font(file: str, size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(os.path.join(font_dir(), file), size)


def _lines(text: str, font, width: int) -> list[str]:
    """Greedy word wrap to `width` pixels."""
    words, lines, cur = text.split(), [], ""
    for w in words:
        cand = (cur + " " + w).strip()
        if not cur or font.getlength(cand) <= width:
            cur = cand
        else:
            lines.append(cur)
            cur = w
    if cur:
        lines.append(cur)
    return lines


def _fit(text: str, file: str, size: int, box: int) -> tuple:
    """Largest font size <= `size` whose wrapped text fits a `box` x `box` square."""
    for s in range(size, 7, -1):
        f = _font(file, s)
        lines = _lines(text, f, box)
        asc, desc = f.getmetrics()
        lh = asc + desc
        if max(f.getlength(l) for l in lines) <= box and lh * len(lines) <= box:
            return f, lines, lh
    f = _font(file, 8)
    return f, textwrap.wrap(text, 18), sum(f.getmetrics())


def _rand_colour(rng, lo=0, hi=256) -> tuple:
    return tuple(int(v) for v in rng.integers(lo, hi, size=3))


def _contrast_pair(rng) -> tuple[tuple, tuple]:
    """(text colour, background colour) with a luminance difference of at least ~110."""
    for _ in range(50):
        a, b = _rand_colour(rng), _rand_colour(rng)
        la = 0.299 * a[0] + 0.587 * a[1] + 0.114 * a[2]
        lb = 0.299 * b[0] + 0.587 * b[1] + 0.114 * b[2]
        if abs(la - lb) >= 110:
            return a, b
    return (0, 0, 0), (255, 255, 255)


def render_text(text: str, rng: np.random.Generator, *, family: str | None = None, style: str | None = None,
                heldout: bool = False) -> np.ndarray:
    """One typographic image of `text`. `family`/`style` default to a random training renderer
    (or, with `heldout`, a held-out font family and/or style: at least one of the two is
    held out)."""
    if family is None or style is None:
        if heldout:
            kind = int(rng.integers(0, 3))  # 0: held-out font, 1: held-out style, 2: both
            fam = HELDOUT_FONTS[int(rng.integers(len(HELDOUT_FONTS)))] if kind != 1 else \
                TRAIN_FONTS[int(rng.integers(len(TRAIN_FONTS)))]
            sty = HELDOUT_STYLES[int(rng.integers(len(HELDOUT_STYLES)))] if kind != 0 else \
                TRAIN_STYLES[int(rng.integers(len(TRAIN_STYLES)))]
        else:
            fam = TRAIN_FONTS[int(rng.integers(len(TRAIN_FONTS)))]
            sty = TRAIN_STYLES[int(rng.integers(len(TRAIN_STYLES)))]
        family = family or fam
        style = style or sty
    files = _FAMILIES[family]
    file = files[int(rng.integers(len(files)))]
    ss = 2  # supersampling
    S = SIZE * ss
    margin = int(rng.integers(6, 14)) * ss
    box = S - 2 * margin
    size = int(rng.integers(14, 26)) * ss
    font, lines, lh = _fit(text, file, size, box)
    if style == "plain":
        fg = tuple(int(v) for v in rng.integers(0, 70, size=3))
        bg = tuple(int(v) for v in rng.integers(200, 256, size=3))
    elif style == "inverse":
        fg = tuple(int(v) for v in rng.integers(190, 256, size=3))
        bg = tuple(int(v) for v in rng.integers(0, 60, size=3))
    else:
        fg, bg = _contrast_pair(rng)
    img = Image.new("RGB", (S, S), bg)
    if style == "outlined":  # two-colour vertical gradient background
        bg2 = _rand_colour(rng)
        t = np.linspace(0, 1, S)[:, None, None]
        arr = (np.array(bg)[None, None] * (1 - t) + np.array(bg2)[None, None] * t).repeat(S, 1)
        img = Image.fromarray(arr.astype(np.uint8))
    d = ImageDraw.Draw(img)
    th = lh * len(lines)
    y = margin + int(rng.integers(0, max(1, box - th + 1)))
    align_left = rng.random() < 0.5
    for line in lines:
        w = font.getlength(line)
        x = margin + (0 if align_left else int(rng.integers(0, max(1, int(box - w) + 1))))
        if style == "outlined":
            d.text((x, y), line, font=font, fill=fg, stroke_width=2 * ss, stroke_fill=_rand_colour(rng))
        else:
            d.text((x, y), line, font=font, fill=fg)
        y += lh
    if style == "rotated":
        ang = float(rng.uniform(-12, 12))
        img = img.rotate(ang, resample=Image.BICUBIC, fillcolor=bg)
    img = img.resize((SIZE, SIZE), Image.LANCZOS)
    a = np.asarray(img).astype(np.float32)
    noise = float(rng.uniform(12, 30)) if style == "noisy" else float(rng.uniform(0, 4))
    if noise > 0:
        a += rng.normal(0, noise, size=a.shape)
    return np.clip(a, 0, 255).astype(np.uint8)


def objectless(kind: str, rng: np.random.Generator) -> np.ndarray:
    """An image that shows nothing: blank, flat colour, noise or a smooth gradient."""
    if kind == "blank_white":
        a = np.full((SIZE, SIZE, 3), 255.0)
    elif kind == "blank_black":
        a = np.zeros((SIZE, SIZE, 3))
    elif kind == "flat_colour":
        a = np.broadcast_to(rng.integers(0, 256, size=3).astype(np.float64), (SIZE, SIZE, 3)).copy()
    elif kind == "uniform_noise":
        a = rng.integers(0, 256, size=(SIZE, SIZE, 3)).astype(np.float64)
    elif kind == "gaussian_noise":
        a = rng.normal(128, 50, size=(SIZE, SIZE, 3))
    elif kind == "gradient":
        c1, c2 = rng.integers(0, 256, size=3), rng.integers(0, 256, size=3)
        t = np.linspace(0, 1, SIZE)[None, :, None] if rng.random() < 0.5 else np.linspace(0, 1, SIZE)[:, None, None]
        a = np.broadcast_to(c1 * (1 - t) + c2 * t, (SIZE, SIZE, 3)).copy()
    else:
        raise ValueError(f"unknown object-less kind {kind!r}; use one of {OBJECTLESS_KINDS}")
    return np.clip(a, 0, 255).astype(np.uint8)


def render_video(text: str, rng: np.random.Generator, frames: int = 4, *, heldout: bool = False) -> np.ndarray:
    """``[frames, SIZE, SIZE, 3]``: the phrase revealed word by word (the last frame shows all of it),
    every frame a fresh sample of one renderer."""
    words = text.split()
    fam_rng = np.random.default_rng(int(rng.integers(0, 2**31)))
    family = None
    style = None
    if heldout:
        family, style = HELDOUT_FONTS[0], HELDOUT_STYLES[0]
    else:
        family = TRAIN_FONTS[int(fam_rng.integers(len(TRAIN_FONTS)))]
        style = TRAIN_STYLES[int(fam_rng.integers(len(TRAIN_STYLES)))]
    out = []
    for k in range(frames):
        n = max(1, int(round(len(words) * (k + 1) / frames)))
        out.append(render_text(" ".join(words[:n]), rng, family=family, style=style))
    return np.stack(out)
