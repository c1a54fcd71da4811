"""Load the shipped organism (offline, instant).

Variants: ``"natural"`` and ``"offset"`` are shipped weight folders (``VARIANTS``, `load_shipped`);
``"video"`` (``BUILT_VARIANTS``) is built on the fly from the natural weights by
:func:`mars_core.organism.video.build_video_organism` (a Video-LLaVA transplant, no weight files);
`mars_core.organism.load_organism` dispatches between them.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import ArtifactError

WEIGHTS = Path(__file__).parent / "weights"
VARIANTS = ("natural", "offset")  # shipped weight folders
BUILT_VARIANTS = ("video",)  # built on the fly from shipped weights


def weights_dir(variant: str = "natural") -> Path:
    d = WEIGHTS / variant
    if variant not in VARIANTS or not (d / "model.safetensors").exists():
        have = sorted(p.name for p in WEIGHTS.iterdir() if (p / "model.safetensors").exists()) \
            if WEIGHTS.exists() else []
        raise ArtifactError(
            f"no shipped organism variant {variant!r} under {WEIGHTS}; available: {have} "
            f"(load_organism also builds {list(BUILT_VARIANTS)} from them). "
            "Retrain with `python -m mars_core.organism.train --seed 0 --out DIR` and load it "
            "with load_checkpoint(DIR/'stage3')."
        )
    return d


def load_checkpoint(path, dtype=None):
    """``(model, processor)`` from a checkpoint folder written by :mod:`.train`."""
    import torch
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    path = Path(path)
    if not (path / "model.safetensors").exists():
        raise ArtifactError(f"{path} holds no model.safetensors; point at a stage folder "
                            "(e.g. runs/organism/seed0/stage3)")
    model = LlavaForConditionalGeneration.from_pretrained(
        path, local_files_only=True, dtype=dtype or torch.float32)
    proc = AutoProcessor.from_pretrained(path, local_files_only=True)
    proc.tokenizer.padding_side = "left"
    model.generation_config.do_sample = False
    return model.eval(), proc


def load_shipped(variant: str = "natural", dtype=None):
    """``(model, processor)`` of a shipped weight folder: ``"natural"`` or ``"offset"``.

    See ``weights/<variant>/MODEL_CARD.md`` for the recipe and the measured behaviour tables.
    """
    return load_checkpoint(weights_dir(variant), dtype=dtype)
