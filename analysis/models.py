"""The one resolver of `--model` specs, and models loaded on first use (`ModelRef`).

Specs every command accepts:
  organism                 the built-in toy organism (shipped weights, `natural`)
  organism:VARIANT         a named variant: natural, offset (projector bias moved along the harm
                           embedding direction), video (Video-LLaVA transplant, image + video)
  organism:RUN_DIR         a training run of `python -m mars_core.organism.train --out RUN_DIR`
                           (its stage3 is the model; its other stages are the checkpoints)
  organism:smol            the SmolLM2-135M-Instruct organism (shipped seed 0;
                           `mars_core.organism.smol`)
  organism:smol:PATH       a SmolLM2 organism training run (`python -m mars_core.organism.smol.train
                           --out PATH`: its stage_c is the model, stage_a / stage_b the checkpoints)
                           or one stage folder
  tiny:FAMILY              a tiny random-weight model of a family (`mars_core.testing.build_tiny`)
  org/name or a folder     a hub id (offline: it must be in the Hugging Face cache) or a local
                           model directory
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Callable

from mars_core.errors import ArtifactError, InputError


class ModelRef:
    """A MarsModel loaded on first `load()` (then kept), with a content fingerprint known before
    loading, so a fully cached run never loads it."""

    def __init__(self, name: str, loader: Callable[[], Any], fingerprint: str):
        self.name, self._loader, self.fingerprint = name, loader, fingerprint
        self._model = None

    def load(self):
        if self._model is None:
            self._model = self._loader()
        return self._model

    def __repr__(self) -> str:
        return f"ModelRef({self.name!r}, fingerprint={self.fingerprint})"


def folder_fingerprint(path: Path) -> str:
    """SHA-256 (hex, 16) of a checkpoint folder's weights and config files."""
    h = hashlib.sha256()
    for name in ("model.safetensors", "config.json", "processor_config.json", "tokenizer.json"):
        f = Path(path) / name
        if f.is_file():
            h.update(name.encode())
            h.update(f.read_bytes())
    return h.hexdigest()[:16]


def checkpoint_ref(name: str, path: Path, model_id: str) -> ModelRef:
    """A toy-organism checkpoint folder (`mars_core.organism.load.load_checkpoint`) as a ModelRef."""
    from mars_core.loading import load_model
    from mars_core.organism.load import load_checkpoint

    path = Path(path)
    return ModelRef(name, lambda: load_model(*load_checkpoint(path), family="llava", model_id=model_id),
                    folder_fingerprint(path))


def organism_kind(spec: Any) -> str | None:
    """The part after "organism:" ("" for plain "organism" or None), or None for other specs."""
    if spec is None:
        return ""
    spec = str(spec)
    if spec == "organism":
        return ""
    return spec.partition(":")[2] if spec.startswith("organism:") else None


def is_smol(kind: str | None) -> bool:
    """Whether an organism spec's part after "organism:" names the SmolLM2 organism."""
    return kind is not None and (kind == "smol" or kind.startswith("smol:"))


def smol_folder(kind: str) -> tuple[Path, Path | None]:
    """(the model's stage folder, the training run folder or None) of "smol" / "smol:PATH"."""
    from mars_core.organism.smol.load import weights_dir

    if kind == "smol":
        return weights_dir(), None
    p = Path(kind[len("smol:"):])
    if (p / "stage_c" / "organism.safetensors").is_file():
        return p / "stage_c", p
    if (p / "organism.safetensors").is_file():
        return p, None
    raise InputError(f"{p} is neither a SmolLM2 organism run (no stage_c/organism.safetensors) nor a stage folder; "
                     "give the --out folder of `python -m mars_core.organism.smol.train` or one of its stage folders")


def smol_ref(name: str, folder: Path, model_id: str) -> ModelRef:
    """A SmolLM2 organism folder (shipped seed or stage folder) as a ModelRef."""
    from mars_core.loading import load_model
    from mars_core.organism.smol import load_smol

    folder = Path(folder)
    fp = hashlib.sha256((folder / "organism.safetensors").read_bytes()).hexdigest()[:16]
    return ModelRef(name, lambda: load_model(*load_smol(folder), family="llava", model_id=model_id), fp)


def open_organism(kind: str):
    """(MarsModel, run folder or None) for an organism spec's part after "organism:"."""
    from mars_core.loading import load_model
    from mars_core.organism import load_organism
    from mars_core.organism.load import BUILT_VARIANTS, VARIANTS, load_checkpoint

    kind = kind or "natural"
    if is_smol(kind):
        folder, run = smol_folder(kind)
        mid = "mars-organism/smol-seed0" if kind == "smol" else f"mars-organism/smol-run:{(run or folder).resolve().name}"
        return smol_ref("smol", folder, mid).load(), run
    if kind in VARIANTS or kind in BUILT_VARIANTS:
        return load_model(*load_organism(kind), model_id=f"mars-organism/{kind}"), None
    run = Path(kind)
    if run.is_dir():
        if not (run / "stage3" / "model.safetensors").exists():
            raise InputError(f"{run} is not an organism training run (no stage3/model.safetensors); give the --out "
                             "folder of `python -m mars_core.organism.train`")
        return load_model(*load_checkpoint(run / "stage3"), family="llava",
                          model_id=f"mars-organism/run:{run.resolve().name}"), run
    raise ArtifactError(f"no shipped organism variant {kind!r}: use organism, organism:VARIANT "
                        f"({', '.join(VARIANTS + BUILT_VARIANTS)}), organism:RUN_DIR (a training run folder), "
                        "organism:smol or organism:smol:RUN_DIR")


def open_model(spec: Any, *, dtype: str | None = None, device_map: str | None = None, remote: Any = False,
               seed: int = 0):
    """The MarsModel for a `--model` spec (module docstring), in the given remote mode.

    NDIF runs hosted models only: an organism or tiny spec with remote=True (NDIF) is an
    InputError (remote="local", the in-process simulation, works for every spec)."""
    from mars_core.loading import load_model
    from mars_core.remote import normalize_mode, use_remote

    mode = normalize_mode(remote)
    kind = organism_kind(spec)
    if kind is not None or str(spec).startswith("tiny:"):
        if mode and mode != "local":
            raise InputError(f"--model {spec or 'organism'} is built in this process and NDIF runs hosted models only; "
                             "use a hub id (--model org/name), or --remote local to dry-run the remote path")
        if kind is not None:
            mm, _ = open_organism(kind)
        else:
            from mars_core.testing import build_tiny

            try:
                tiny = build_tiny(str(spec)[len("tiny:"):], seed=seed)
            except ValueError as e:
                raise InputError(str(e)) from None
            mm = load_model(tiny.model, tiny.processor or tiny.tokenizer, model_id=str(spec))
        if mode:
            use_remote(mm, mode)
        return mm
    if not isinstance(spec, (str, Path)):
        if hasattr(spec, "build_batch") and hasattr(spec, "nn"):
            return spec  # a MarsModel in memory
        raise InputError(f"model must be a spec string (organism, a hub id, ...) or a MarsModel, not "
                         f"{type(spec).__name__}")
    return load_model(str(spec), dtype=dtype, device_map=device_map, remote=mode)
