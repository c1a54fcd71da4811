"""What MARS needs per layer (`MarsCalibration`), and its one measuring path (`neutral_calibration`).

A calibration holds, per decoder layer l, the text unit refusal direction r_l, the projections
p_harm / p_safe of the text harmful / harmless centroids on it, and per modality m the offset
o_m,l = mean(neutral m inputs) - mean(the same benign requests as text), at the last prompt
position. No unsafe multimodal data is involved. `calibrate_mars` is the same path on generated
neutral sets (`mars_core.steering.neutral.neutral_sets`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import einops
import torch

from ..errors import ArtifactError, IncompatibleModelError, InputError, MarsError
from ..provenance import fingerprint, make_provenance, read_tensor_file, save_tensor_file
from .operator import MODALITIES

CALIBRATION_FORMAT = "mars-calibration"
CALIBRATION_VERSION = "1"


@dataclass(eq=False)
class MarsCalibration:
    """Everything MARS needs per layer, measured once per model.

    Fields (float64, CPU; L = len(layers), D = d_model):
      layers      decoder-layer indices that index dim 0
      direction   [L, D] unit text refusal direction r_l (harmful minus harmless, position `pos`)
      p_harm      [L] mu_harm_l . r_l      p_safe [L] mu_safe_l . r_l   (p_harm > p_safe)
      offsets     {modality: [L, D]} o_m,l = mean(neutral m inputs) - mean(neutral text inputs),
                  last prompt position; "text" is implicitly zero and not stored
      pos         position of the directions/centroids (-1: last prompt token)
      n_layers, d_model   shape of the model (checked on load and use)
      layers_path where the decoder layers live (lets apply() take a bare nnsight model)
      provenance  flat dict (model id, directions' provenance, neutral-set hashes, version)
    """

    layers: tuple[int, ...]
    direction: torch.Tensor
    p_harm: torch.Tensor
    p_safe: torch.Tensor
    offsets: dict[str, torch.Tensor]
    n_layers: int
    d_model: int
    pos: int = -1
    layers_path: str | None = None
    provenance: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        self.layers = tuple(int(x) for x in self.layers)
        L, D = len(self.layers), int(self.d_model)
        self.direction = torch.as_tensor(self.direction, dtype=torch.float64).cpu()
        self.p_harm = torch.as_tensor(self.p_harm, dtype=torch.float64).cpu().flatten()
        self.p_safe = torch.as_tensor(self.p_safe, dtype=torch.float64).cpu().flatten()
        if tuple(self.direction.shape) != (L, D):
            raise InputError(f"direction has shape {tuple(self.direction.shape)}, expected {(L, D)}")
        if self.p_harm.shape != (L,) or self.p_safe.shape != (L,):
            raise InputError(f"p_harm/p_safe must have shape ({L},)")
        offs = {}
        for m, o in dict(self.offsets).items():
            if m not in MODALITIES or m == "text":
                raise InputError(f"offset modality {m!r}; use 'image' or 'video' (text is zero by definition)")
            o = torch.as_tensor(o, dtype=torch.float64).cpu()
            if tuple(o.shape) != (L, D):
                raise InputError(f"offset[{m!r}] has shape {tuple(o.shape)}, expected {(L, D)}")
            offs[m] = o
        self.offsets = offs
        for name in ("direction", "p_harm", "p_safe"):
            if not torch.isfinite(getattr(self, name)).all():
                raise MarsError(f"calibration {name} is not finite")
        bad = [l for l, g in zip(self.layers, (self.p_harm - self.p_safe).tolist()) if not g > 0]
        if bad:
            raise MarsError(
                f"at layers {bad} the harmful centroid does not project above the harmless one "
                "(p_harm <= p_safe): the direction is degenerate there; re-extract directions or "
                "exclude those layers"
            )

    # -- construction --------------------------------------------------------------------------
    @classmethod
    def from_directions(cls, directions: Any, offsets: dict[str, torch.Tensor] | None = None, *,
                        pos: int = -1, layers: Sequence[int] | None = None, layers_path: str | None = None,
                        provenance: dict | None = None) -> "MarsCalibration":
        """Directions and centroid projections from a RefusalDirections; offsets [L, D] per modality
        (for the same `layers`; default: all layers the directions hold)."""
        layers = tuple(directions.layers if layers is None else (int(l) % directions.n_layers for l in layers))
        r = torch.stack([directions.direction(l, pos, unit=True) for l in layers])
        mh, ms = zip(*(directions.centroids(l, pos) for l in layers))
        p_harm = torch.einsum("ld,ld->l", torch.stack(mh), r)
        p_safe = torch.einsum("ld,ld->l", torch.stack(ms), r)
        prov = dict(provenance or {})
        dprov = getattr(directions, "provenance", {}) or {}
        prov.setdefault("directions_provenance", json.dumps(dprov, sort_keys=True, default=str))
        prov.setdefault("directions_fingerprint", directions.fingerprint)
        prov.setdefault("model_id", dprov.get("model_id", ""))
        return cls(layers, r, p_harm, p_safe, dict(offsets or {}), int(directions.n_layers), int(directions.d_model),
                   pos=pos, layers_path=layers_path, provenance=make_provenance(**prov))

    def with_offsets(self, other: "MarsCalibration") -> "MarsCalibration":
        """This calibration plus `other`'s offsets (same layers and directions; `other` wins on a
        shared modality), e.g. a video offset measured later."""
        if other.layers != self.layers or not torch.equal(other.direction, self.direction):
            raise InputError("cannot merge calibrations of different layers or directions")
        prov = {**self.provenance, **{f"merged_{k}": v for k, v in other.provenance.items() if k.endswith("_sha256")}}
        return MarsCalibration(self.layers, self.direction, self.p_harm, self.p_safe, {**self.offsets, **other.offsets},
                               self.n_layers, self.d_model, pos=self.pos, layers_path=self.layers_path,
                               provenance=prov)

    # -- access --------------------------------------------------------------------------------
    def index(self, layer: int) -> int:
        from ..directions import layer_index

        return layer_index(self.layers, self.n_layers, layer, "is not calibrated")

    def at(self, layer: int) -> dict[str, Any]:
        """{r [D], p_harm, p_safe, gap, offsets {m: [D]}} at `layer` (float64)."""
        i = self.index(layer)
        return {
            "r": self.direction[i].clone(),
            "p_harm": float(self.p_harm[i]),
            "p_safe": float(self.p_safe[i]),
            "gap": float(self.p_harm[i] - self.p_safe[i]),
            "offsets": {m: o[i].clone() for m, o in self.offsets.items()},
        }

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(self.offsets)

    @property
    def fingerprint(self) -> str:
        """Content hash of the tensors and the shape (not the provenance): equal calibrations
        have equal fingerprints."""
        return fingerprint({"layers": self.layers, "direction": self.direction, "p_harm": self.p_harm,
                            "p_safe": self.p_safe, "offsets": self.offsets, "pos": self.pos,
                            "shape": (self.n_layers, self.d_model)})

    def check_model(self, model: Any) -> None:
        """IncompatibleModelError unless `model` has this calibration's layer count and d_model."""
        from ..directions import model_shape

        m_layers, m_d = model_shape(model)
        if (m_layers, m_d) != (self.n_layers, self.d_model):
            raise IncompatibleModelError(
                f"this MARS calibration is for a model with {self.n_layers} layers and d_model="
                f"{self.d_model} (model {self.provenance.get('model_id', '?')!r}); the given model has "
                f"{m_layers} layers and d_model={m_d}. Calibrate for this model with neutral_calibration"
            )

    def to_xarray(self):
        """Labeled view: direction/offsets [layer, d_model], p_harm/p_safe/gap and each offset's
        projection on r [layer]."""
        import xarray as xr

        data = {
            "direction": (("layer", "d_model"), self.direction.numpy()),
            "p_harm": (("layer",), self.p_harm.numpy()),
            "p_safe": (("layer",), self.p_safe.numpy()),
            "gap": (("layer",), (self.p_harm - self.p_safe).numpy()),
        }
        for m, o in self.offsets.items():
            data[f"offset_{m}"] = (("layer", "d_model"), o.numpy())
            data[f"offset_{m}_proj"] = (("layer",), torch.einsum("ld,ld->l", o, self.direction).numpy())
        return xr.Dataset(data, coords={"layer": list(self.layers)}, attrs=dict(self.provenance))

    # -- persistence ---------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """Write safetensors atomically (bit-exact tensors; metadata as strings)."""
        tensors = {
            "layers": torch.tensor(self.layers, dtype=torch.int64),
            "direction": self.direction,
            "p_harm": self.p_harm,
            "p_safe": self.p_safe,
            **{f"offset.{m}": o for m, o in self.offsets.items()},
        }
        meta = {"n_layers": str(self.n_layers), "d_model": str(self.d_model), "pos": str(self.pos),
                "layers_path": self.layers_path or ""}
        return save_tensor_file(path, tensors, meta, fmt=CALIBRATION_FORMAT, version=CALIBRATION_VERSION,
                                provenance=self.provenance)

    @classmethod
    def load(cls, path: str | os.PathLike, model: Any = None) -> "MarsCalibration":
        """Read a file written by `save`; IncompatibleModelError if `model` (MarsModel, HF model or
        config) has another layer count or d_model; ArtifactError if unreadable."""
        path = Path(path)
        t, meta, prov = read_tensor_file(path, fmt=CALIBRATION_FORMAT, version=CALIBRATION_VERSION,
                                         what="MARS calibration", required=("layers", "direction", "p_harm", "p_safe"))
        try:
            calib = cls(
                layers=tuple(t["layers"].tolist()),
                direction=t["direction"],
                p_harm=t["p_harm"],
                p_safe=t["p_safe"],
                offsets={k.split(".", 1)[1]: v for k, v in t.items() if k.startswith("offset.")},
                n_layers=int(meta["n_layers"]),
                d_model=int(meta["d_model"]),
                pos=int(meta["pos"]),
                layers_path=meta.get("layers_path") or None,
                provenance=prov,
            )
        except KeyError as e:
            raise ArtifactError(f"{path} is incomplete: missing {e}") from e
        if model is not None:
            calib.check_model(model)
        return calib

    def __repr__(self) -> str:
        return (
            f"MarsCalibration(layers={len(self.layers)}/{self.n_layers}, d_model={self.d_model}, "
            f"modalities={list(self.offsets)}, model={self.provenance.get('model_id', '')!r})"
        )


# ============================================================================ measuring
def last_position_means(mm: Any, ps: Any, *, layers: Sequence[int] | None = None, batch_size: int = 8) -> torch.Tensor:
    """Mean residual stream of a PromptSet at the last prompt column, [L, D] float64."""
    from ..capture import collect_activations

    ds = collect_activations(mm, ps.texts, **ps.media_kwargs(), layers=layers, positions="last", reduce="mean",
                             batch_size=batch_size, progress=False)
    return torch.from_numpy(einops.rearrange(ds["mean"].values, "layer 1 d -> layer d")).to(torch.float64)


def _check_shape(mm: Any, directions: Any) -> None:
    from ..directions import model_shape

    if model_shape(mm) != (int(directions.n_layers), int(directions.d_model)):
        raise IncompatibleModelError(
            f"the directions are for {directions.n_layers} layers / d_model={directions.d_model}, the model "
            f"has {mm.n_layers} / {mm.d_model}; extract directions for this model"
        )


def neutral_calibration(mm: Any, directions: Any, neutral_text: Any, neutral_media: Mapping[str, Any], *,
                        layers: Sequence[int] | None = None, batch_size: int = 8) -> MarsCalibration:
    """The calibration of `mm`: text directions plus o_m = mean(neutral_media[m]) - mean(text
    baseline of m) at the last prompt position of every layer (or `layers`).

    A text-only model needs no neutral media (empty `neutral_media`): the calibration then holds
    the directions and centroids only.
    neutral_text: a PromptSet of benign requests without media (the baseline of every modality),
    or {modality: PromptSet} (one baseline per modality, e.g. the same requests as that
    modality's media set); neutral_media: {modality: PromptSet of benign requests with neutral
    images/videos}. No unsafe data is involved.
    """
    _check_shape(mm, directions)
    lay = list(directions.layers if layers is None else sorted({int(l) % mm.n_layers for l in layers}))
    if not neutral_media:
        if mm.supports_image or mm.supports_video:
            raise InputError("neutral_media is empty; give {modality: PromptSet} of neutral images or videos "
                             "(mars_core.steering.neutral_sets makes some)")
        # a text-only model: MARS steers text only, there is no modality offset to measure
        return MarsCalibration.from_directions(directions, {}, layers=lay, layers_path=mm.family.layers_path,
                                               provenance={"model_id": getattr(mm, "model_id", "")})
    per_mod = isinstance(neutral_text, Mapping)
    missing = [m for m in neutral_media if per_mod and m not in neutral_text]
    if missing:
        raise InputError(f"no text baseline for {missing}: give neutral_text as one PromptSet or one per modality")
    prov: dict[str, Any] = {"model_id": getattr(mm, "model_id", "")}
    means_t: dict[str, torch.Tensor] = {}
    offsets = {}
    for m, ps in neutral_media.items():
        if ps.modality != m:
            raise InputError(f"neutral_media[{m!r}] is a {ps.modality} set ({ps.name!r}); key it by its modality")
        base = neutral_text[m] if per_mod else neutral_text
        if base.modality != "text":
            raise InputError(f"the text baseline {base.name!r} has media; give benign requests without media")
        if base.sha256 not in means_t:
            means_t[base.sha256] = last_position_means(mm, base, layers=lay, batch_size=batch_size)
            prov.update(base.provenance())
        offsets[m] = last_position_means(mm, ps, layers=lay, batch_size=batch_size) - means_t[base.sha256]
        prov.update(ps.provenance())
    return MarsCalibration.from_directions(directions, offsets, layers=lay, layers_path=mm.family.layers_path,
                                           provenance=prov)


def calibrate_mars(mm: Any, directions: Any, *, modalities: Sequence[str] | None = None, n_neutral: int = 8,
                   seed: int = 0, pos: int = -1, layers: Sequence[int] | None = None, batch_size: int = 8,
                   image_size: int | None = None, frames: int = 4) -> MarsCalibration:
    """`neutral_calibration` on generated neutral sets: for each modality m (default: every one the
    model takes), n_neutral object-less m inputs (solid colour / noise images at the model's
    resolution, blank / noise videos) with that modality's benign requests, against the same
    requests as text (`neutral.neutral_sets`)."""
    from .neutral import neutral_sets

    _check_shape(mm, directions)
    if pos != -1:
        raise InputError("MARS steers the last prompt position; calibrate with pos=-1")
    if modalities is None:
        modalities = [m for m, ok in (("image", mm.supports_image), ("video", mm.supports_video)) if ok]
    mods = [m for m in modalities if m != "text"]
    bad = [m for m in mods if m not in ("image", "video")]
    if bad:
        raise InputError(f"modalities {bad}; use 'image' or 'video'")
    if not mods:  # a text-only model: directions and centroids only
        return MarsCalibration.from_directions(directions, {}, layers=layers, layers_path=mm.family.layers_path,
                                               provenance={"model_id": getattr(mm, "model_id", "")})
    texts, media = {}, {}
    for m in mods:
        t, med = neutral_sets(mm, [m], n_neutral, seed=seed, size=image_size, frames=frames)
        texts[m], media[m] = t, med[m]
    return neutral_calibration(mm, directions, texts, media, layers=layers, batch_size=batch_size)
