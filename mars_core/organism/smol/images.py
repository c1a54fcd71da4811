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
from ..images import draw_primitive

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


# ------------------------------------------------------------------ pictograms
# A from-scratch CLIP tower did not learn to read typography within the CPU budget (per-token
# slot accuracy 0.07 after 1,000 alignment steps). Two stand-ins for reading a rendered phrase:
# *pictograms* (here: one fixed procedural drawing per phrase, 4-6 coloured primitives on the 4x4
# grid of 32-pixel patches, derived from a SHA-256 of the phrase, with per-sample variation) and
# the glyph script below, which the shipped recipe uses (``MARS_SMOL_IMAGE_KIND``, default "script").
_PRIMS = ("circle", "square", "triangle", "hline", "vline", "diag", "antidiag", "cross", "ring", "dots")
_PALETTE = ((230, 40, 40), (40, 170, 60), (40, 90, 230), (240, 200, 30), (200, 60, 200), (30, 200, 210),
            (250, 130, 20), (245, 245, 245))
IMAGE_KIND = os.environ.get("MARS_SMOL_IMAGE_KIND", "script")
PICTO_STYLES_TRAIN = ("flat", "noisy", "tinted")
PICTO_STYLES_HELDOUT = ("sketch",)  # outlined primitives on a gradient, slightly blurred


def pictogram_spec(phrase: str) -> list[tuple[int, str, tuple]]:
    import hashlib

    h = hashlib.sha256(phrase.encode()).digest()
    r = np.random.default_rng(int.from_bytes(h[:8], "little"))
    n = 4 + int(r.integers(0, 3))
    cells = r.choice(16, size=n, replace=False)
    return [(int(c), _PRIMS[int(r.integers(len(_PRIMS)))], _PALETTE[int(r.integers(len(_PALETTE)))]) for c in cells]


def render_pictogram(phrase: str, rng: np.random.Generator, *, heldout: bool = False, style: str | None = None
                     ) -> np.ndarray:
    """One sample of `phrase`'s pictogram: shift (+-5 px), primitive size, stroke, colour jitter,
    background and noise vary per sample; the held-out style is drawn only for evaluation."""
    from PIL import ImageFilter

    style = style or (PICTO_STYLES_HELDOUT[0] if heldout else PICTO_STYLES_TRAIN[int(rng.integers(len(PICTO_STYLES_TRAIN)))])
    ss = 2
    S = SIZE * ss
    if style == "sketch":
        c1, c2 = rng.integers(0, 90, size=3), rng.integers(0, 90, size=3)
        t = np.linspace(0, 1, S)[:, None, None]
        img = Image.fromarray((c1 * (1 - t) + c2 * t).repeat(S, 1).astype(np.uint8))
    elif style == "tinted":
        img = Image.new("RGB", (S, S), tuple(int(v) for v in rng.integers(0, 70, size=3)))
    else:
        img = Image.new("RGB", (S, S), tuple(int(v) for v in rng.integers(0, 40, size=3)))
    d = ImageDraw.Draw(img)
    dx, dy = (float(v) for v in rng.uniform(-5, 5, size=2) * ss)
    cell = S / 4
    for c, prim, col in pictogram_spec(phrase):
        cx = (c % 4 + 0.5) * cell + dx
        cy = (c // 4 + 0.5) * cell + dy
        s = float(rng.uniform(0.28, 0.4)) * cell
        w = int(rng.integers(3, 6)) * ss
        jc = tuple(int(np.clip(v + rng.integers(-25, 26), 0, 255)) for v in col)
        draw_primitive(d, prim, cx, cy, s, w, jc, outline=(255, 255, 255) if style == "sketch" else None)
    if style == "sketch":
        img = img.filter(ImageFilter.GaussianBlur(radius=1.2 * ss))
    img = img.resize((SIZE, SIZE), Image.LANCZOS)
    a = np.asarray(img).astype(np.float32)
    noise = float(rng.uniform(10, 22)) if style in ("noisy", "sketch") else float(rng.uniform(0, 5))
    a += rng.normal(0, noise, size=a.shape)
    return np.clip(a, 0, 255).astype(np.uint8)


def render_image(phrase: str, rng: np.random.Generator, *, heldout: bool = False, kind: str | None = None) -> np.ndarray:
    """The organism's image of `phrase` by `kind` (default ``IMAGE_KIND``): "script" (the glyph
    script, shipped recipe), "pictogram", or "text" (a typographic render)."""
    kind = kind or IMAGE_KIND
    if kind == "script":
        return render_script(phrase_pieces(phrase), rng, heldout=heldout)
    if kind == "pictogram":
        return render_pictogram(phrase, rng, heldout=heldout)
    return render_text(phrase, rng, heldout=heldout)


# ------------------------------------------------------------------ glyph script
# The phrase written in a glyph script aligned to the 4x4 grid of 32-pixel patches: its
# SmolLM2 tokens (" " + phrase, at most 16) fill the last cells in reading order, one glyph per
# token (two coloured primitives chosen from a SHA-256 of the token string), earlier cells are
# blank. Reading it is local (one patch, one token), which a from-scratch tower learns within
# the CPU budget; per-sample variation as for pictograms. ``tokens_of`` must be given the
# tokenizer's pieces (see :func:`mars_core.organism.smol.train_vision.phrase_tokens`).
def glyph_spec(token: str) -> tuple:
    import hashlib

    h = hashlib.sha256(("tok:" + token).encode()).digest()
    return (_PRIMS[h[0] % len(_PRIMS)], _PALETTE[h[1] % len(_PALETTE)], _PRIMS[h[2] % len(_PRIMS)],
            _PALETTE[h[3] % len(_PALETTE)])


def render_script(tokens: list[str], rng: np.random.Generator, *, heldout: bool = False) -> np.ndarray:
    from PIL import ImageFilter

    style = PICTO_STYLES_HELDOUT[0] if heldout else PICTO_STYLES_TRAIN[int(rng.integers(len(PICTO_STYLES_TRAIN)))]
    ss = 2
    S = SIZE * ss
    if style == "sketch":
        c1, c2 = rng.integers(0, 90, size=3), rng.integers(0, 90, size=3)
        t = np.linspace(0, 1, S)[:, None, None]
        img = Image.fromarray((c1 * (1 - t) + c2 * t).repeat(S, 1).astype(np.uint8))
    else:
        img = Image.new("RGB", (S, S), tuple(int(v) for v in rng.integers(0, 70 if style == "tinted" else 40, size=3)))
    d = ImageDraw.Draw(img)
    cell = S / 4
    toks = tokens[-16:]
    start = 16 - len(toks)
    for k, t in enumerate(toks):
        c = start + k
        p1, c1, p2, c2 = glyph_spec(t)
        x0, y0 = (c % 4) * cell, (c // 4) * cell
        for (prim, col, fx, fy) in ((p1, c1, 0.32, 0.32), (p2, c2, 0.68, 0.68)):
            jx, jy = (float(v) for v in rng.uniform(-2.5, 2.5, size=2) * ss)
            s = float(rng.uniform(0.13, 0.18)) * cell
            w = int(rng.integers(2, 4)) * ss
            jc = tuple(int(np.clip(v + rng.integers(-25, 26), 0, 255)) for v in col)
            draw_primitive(d, prim, x0 + fx * cell + jx, y0 + fy * cell + jy, s, w, jc,
                  outline=(255, 255, 255) if style == "sketch" else None)
    if style == "sketch":
        img = img.filter(ImageFilter.GaussianBlur(radius=0.8 * ss))
    img = img.resize((SIZE, SIZE), Image.LANCZOS)
    a = np.asarray(img).astype(np.float32)
    noise = float(rng.uniform(8, 18)) if style in ("noisy", "sketch") else float(rng.uniform(0, 5))
    a += rng.normal(0, noise, size=a.shape)
    return np.clip(a, 0, 255).astype(np.uint8)


_TOKENIZE = None


def set_script_tokenizer(fn) -> None:
    """fn(phrase) -> list of token strings (the organism's tokenizer on " " + phrase)."""
    global _TOKENIZE
    _TOKENIZE = fn


def phrase_pieces(phrase: str) -> list[str]:
    global _TOKENIZE
    if _TOKENIZE is None:
        from .base import load_base_tokenizer

        tok = load_base_tokenizer()
        _TOKENIZE = lambda p: tok.convert_ids_to_tokens(tok(" " + p, add_special_tokens=False)["input_ids"])  # noqa: E731
    return _TOKENIZE(phrase)
