"""A small trained multimodal "model organism" for MARS (issue 4).

A ~1M-parameter ``LlavaForConditionalGeneration`` (CLIP tower on 32x32 procedurally drawn
glyph images, 4-layer Llama, word-level tokenizer) trained in stages by
:mod:`mars_core.organism.train` so that it refuses harmful text requests, mostly does not
refuse the same requests when the concept arrives through an image (the safety gap), and
still carries the text-derived harmfulness direction in its image activations.

``load_organism()`` loads the shipped weights offline; see ``weights/<variant>/MODEL_CARD.md``.
``load_organism("video")`` transplants the natural weights into Video-LLaVA (image and video
input, no training; :mod:`.video`, measured in the natural card's Video section).
"""

from __future__ import annotations

from .concepts import (
    HARMFUL,
    HARMLESS,
    HELDOUT_HARMFUL,
    HELDOUT_HARMLESS,
    REFUSAL,
)

__all__ = [
    "HARMFUL",
    "HARMLESS",
    "HELDOUT_HARMFUL",
    "HELDOUT_HARMLESS",
    "REFUSAL",
    "build_video_organism",
    "load_organism",
]


def load_organism(variant: str = "natural", dtype=None):
    """``(model, processor)`` of a variant: ``"natural"`` or ``"offset"`` (shipped weights,
    :func:`.load.load_shipped`), or ``"video"``: the natural organism transplanted into
    ``VideoLlavaForConditionalGeneration`` (image and video input; built in well under a second,
    zero-shot, :mod:`.video`)."""
    if variant == "video":
        from .video import build_video_organism

        return build_video_organism("natural", dtype=dtype)
    from .load import load_shipped

    return load_shipped(variant, dtype=dtype)


def build_video_organism(variant: str = "natural", **kw):
    """Video-LLaVA transplant of a shipped variant: ``(model, processor)``. See :mod:`.video`."""
    from .video import build_video_organism as _build

    return _build(variant, **kw)
