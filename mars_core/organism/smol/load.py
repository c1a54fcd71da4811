"""Load the SmolLM2 organism: the shipped seed (default) or a training run's stage folder.

    from mars_core.organism.smol.load import load_smol
    model, processor = load_smol()                      # shipped seed 0
    model, processor = load_smol("runs/smol/seed1/stage_c")
    mm = mars_core.load_model(model, processor)          # family "llava"

A folder holds only what the project trained (``organism.safetensors``: LoRA factors of stages a
and c, vision tower, projector, the ``<image>`` embedding row) plus configs. The rest comes from
the SmolLM2 base (converted once into the user cache by :mod:`.base`). Loading rebuilds the
LLaVA model, puts SmolLM2's weights in, merges the LoRA factors in training order with the same
arithmetic as training (so the loaded weights equal the trained ones bit for bit) and loads the
vision side. Offline; ~2-4 s once the base is converted.
"""

from __future__ import annotations

import json
from pathlib import Path

from ...errors import ArtifactError

WEIGHTS = Path(__file__).parent / "weights"
DEFAULT_SEED = 0
FORMAT = "mars.smol-organism"


def weights_dir(seed: int = DEFAULT_SEED) -> Path:
    d = WEIGHTS / f"seed{seed}"
    if not (d / "organism.safetensors").is_file():
        have = sorted(p.name for p in WEIGHTS.glob("seed*") if (p / "organism.safetensors").is_file()) \
            if WEIGHTS.exists() else []
        raise ArtifactError(f"no shipped SmolLM2 organism seed {seed} under {WEIGHTS} (have {have}); train one with "
                            f"`python -m mars_core.organism.smol.train --seed {seed} --out DIR` and load DIR/stage_c")
    return d


def read_folder(path) -> tuple[dict, dict, dict]:
    """(tensors, safetensors metadata, provenance) of an organism folder."""
    from safetensors import safe_open

    path = Path(path)
    f = path / "organism.safetensors"
    if not f.is_file():
        raise ArtifactError(f"{path} holds no organism.safetensors; point at a stage folder (e.g. runs/smol/seed0/stage_c) "
                            "or a shipped weights/seed<k> folder")
    try:
        with safe_open(str(f), framework="pt") as h:
            meta = h.metadata() or {}
            tensors = {k: h.get_tensor(k) for k in h.keys()}
    except Exception as e:
        raise ArtifactError(f"cannot read {f}: {e}") from e
    if meta.get("format") != FORMAT:
        raise ArtifactError(f"{f} is not a SmolLM2 organism file (format {meta.get('format')!r})")
    prov = json.loads(meta.get("provenance", "{}"))
    return tensors, meta, prov


def assemble(tensors: dict, prov: dict, base_model, tok):
    """The LLaVA organism from the base and the trained tensors (see module docstring)."""
    import torch

    from .build import build_model
    from .tuning import merge_lora

    with torch.random.fork_rng(devices=[]):
        model = build_model(0, base_model, tok)
    scales = json.loads(prov.get("lora_scales", "{}")) if isinstance(prov.get("lora_scales"), str) \
        else prov.get("lora_scales", {})
    with torch.no_grad():
        if "image_token_embedding" in tensors:
            model.model.language_model.embed_tokens.weight[-1] = tensors["image_token_embedding"]
    for stage in ("a", "c"):  # training order
        lt = {k[len(f"lora_{stage}."):]: v for k, v in tensors.items() if k.startswith(f"lora_{stage}.")}
        if lt:
            merge_lora(model, lt, float(scales[stage]))
    vis = {k[len("vision."):]: v for k, v in tensors.items() if k.startswith("vision.")}
    proj = {k[len("projector."):]: v for k, v in tensors.items() if k.startswith("projector.")}
    if vis:
        model.model.vision_tower.load_state_dict(vis, strict=True)
    if proj:
        model.model.multi_modal_projector.load_state_dict(proj, strict=True)
    return model.eval()


def load_smol(path=None, dtype=None, device: str | None = None):
    """``(LlavaForConditionalGeneration, LlavaProcessor)`` of the organism at `path` (a stage folder
    or a shipped ``weights/seed<k>`` folder; default: the shipped seed 0), float32 unless `dtype`."""
    import torch

    from .base import load_base
    from .build import build_processor, build_tokenizer

    path = Path(path) if path is not None else weights_dir()
    tensors, _meta, prov = read_folder(path)
    bm, btok = load_base()
    tok = build_tokenizer(btok)
    model = assemble(tensors, prov, bm, tok)
    del bm
    if dtype is not None and dtype != torch.float32:
        model = model.to(dtype)
    if device:
        model = model.to(device)
    proc = build_processor(tok)
    model.config._name_or_path = str(path)
    return model, proc


def load_smol_seed(seed: int = DEFAULT_SEED, **kw):
    return load_smol(weights_dir(seed), **kw)
