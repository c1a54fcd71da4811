"""Textual refusal directions: difference of means, harmful minus harmless.

For a model with L decoder layers and hidden size D, and the post-instruction positions
P = (p_1, ..., p_k) (negative column offsets from the end of the prompt, i.e. the chat-template
tokens after the user text, the same for every row), this module computes in float64

    mu_harm[l, p]  = (1/N_harm) * sum_{i in harmful}  h_i[l, p]          [L, k, D]
    mu_safe[l, p]  = (1/N_safe) * sum_{i in harmless} h_i[l, p]          [L, k, D]
    diff[l, p]     = mu_harm[l, p] - mu_safe[l, p]                      [L, k, D]
    unit[l, p]     = diff[l, p] / ||diff[l, p]||_2     (0 where the norm is 0)

where h_i[l, p] is the output of decoder layer l (the residual stream after block l) of the
language backbone at column p of prompt i (read through nnsight by
`mars_core.capture.collect_activations`, summed in float64 while streaming).

The result is a `RefusalDirections`, saved as safetensors (tensors plus a JSON provenance in the
metadata; never pickle) and reloaded bit-exactly. Loading onto a model whose d_model or layer
count differs raises `IncompatibleModelError`.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from .errors import ArtifactError, IncompatibleModelError, InputError, MarsError
from .provenance import make_provenance, read_tensor_file, save_tensor_file, sha256_text

FORMAT_NAME = "mars.refusal_directions"
FORMAT_VERSION = "1"
_TENSOR_KEYS = ("harmful_mean", "harmless_mean", "mean_diff", "unit", "layers", "positions")


def _check_prompts(prompts: Any, what: str) -> list[str]:
    """Validate a prompt set: a non-empty sequence of non-empty strings."""
    if isinstance(prompts, str):
        raise InputError(f"{what} prompts must be a list of strings, got a single string; wrap it in a list.")
    try:
        out = list(prompts)
    except TypeError as e:
        raise InputError(f"{what} prompts must be a list of strings, got {type(prompts).__name__}.") from e
    if not out:
        raise InputError(
            f"The {what} prompt set is empty; a difference of means needs at least one prompt on each side."
        )
    for i, p in enumerate(out):
        if not isinstance(p, str):
            raise InputError(f"{what} prompt {i} is {type(p).__name__}, not str.")
        if not p.strip():
            raise InputError(f"{what} prompt {i} is empty or whitespace; remove it.")
    return out


def _model_shape(model: Any) -> tuple[int, int]:
    """(n_layers, d_model) of a MarsModel, or of an HF model / config (text backbone)."""
    if hasattr(model, "n_layers") and hasattr(model, "d_model"):
        return int(model.n_layers), int(model.d_model)
    cfg = getattr(model, "config", model)
    cfg = getattr(cfg, "text_config", None) or cfg
    try:
        return int(cfg.num_hidden_layers), int(cfg.hidden_size)
    except AttributeError as e:
        raise InputError(
            f"Cannot read layer count and d_model from {type(model).__name__}; pass a MarsModel "
            "(from mars_core.load_model) or a transformers model/config."
        ) from e


model_shape = _model_shape


def layer_index(layers: Sequence[int], n_layers: int, layer: int, missing: str = "is not available") -> int:
    """Position of decoder layer `layer` (negative counts from the end of `n_layers`) in `layers`;
    InputError "layer L <missing>; available layers: [...]" when it is not there."""
    layer = int(layer)
    if layer < 0:
        layer += n_layers
    try:
        return list(layers).index(layer)
    except ValueError:
        raise InputError(f"layer {layer} {missing}; available layers: {list(layers)}") from None


@dataclass(eq=False)
class RefusalDirections:
    """Harmful/harmless centroids and their difference at every (layer, position).

    Fields (all tensors float64 on CPU; L = len(layers), P = len(positions), D = d_model):
      harmful_mean  [L, P, D]  mean residual stream over harmful prompts
      harmless_mean [L, P, D]  mean residual stream over harmless prompts
      mean_diff     [L, P, D]  harmful_mean - harmless_mean (the raw, unnormalised direction)
      unit          [L, P, D]  mean_diff / ||mean_diff|| (zero vector where the norm is zero)
      layers        tuple of decoder-layer indices (0-based) that index dim 0
      positions     tuple of negative column offsets that index dim 1 (e.g. (-5, ..., -1))
      n_harmful, n_harmless   prompt counts behind each mean
      n_layers, d_model       shape of the model they were extracted from (checked on load)
      provenance    flat dict: model id / config hash, dtype, prompt-set sha256 and sizes,
                    seed, mars version, creation time
    """

    harmful_mean: torch.Tensor
    harmless_mean: torch.Tensor
    layers: tuple[int, ...]
    positions: tuple[int, ...]
    n_harmful: int
    n_harmless: int
    n_layers: int
    d_model: int
    provenance: dict[str, Any] = field(default_factory=dict)
    mean_diff: torch.Tensor | None = None
    unit: torch.Tensor | None = None

    def __post_init__(self) -> None:
        self.harmful_mean = torch.as_tensor(self.harmful_mean, dtype=torch.float64).cpu()
        self.harmless_mean = torch.as_tensor(self.harmless_mean, dtype=torch.float64).cpu()
        self.layers = tuple(int(x) for x in self.layers)
        self.positions = tuple(int(x) for x in self.positions)
        shape = (len(self.layers), len(self.positions), int(self.d_model))
        for name in ("harmful_mean", "harmless_mean"):
            t = getattr(self, name)
            if tuple(t.shape) != shape:
                raise InputError(f"{name} has shape {tuple(t.shape)}, expected [layer, pos, d_model] = {shape}.")
            if not torch.isfinite(t).all():
                bad = (~torch.isfinite(t)).nonzero()[0].tolist()
                raise MarsError(
                    f"{name} contains NaN/inf (first at layer {self.layers[bad[0]]}, pos "
                    f"{self.positions[bad[1]]}): the model produced non-finite activations. Check the "
                    "model weights/dtype (float16 overflow is common; try float32 or bfloat16)."
                )
        if self.n_harmful <= 0 or self.n_harmless <= 0:
            raise InputError(
                f"Prompt counts must be positive (harmful={self.n_harmful}, harmless={self.n_harmless})."
            )
        if self.mean_diff is None:
            self.mean_diff = self.harmful_mean - self.harmless_mean
        if self.unit is None:
            norm = self.mean_diff.norm(dim=-1, keepdim=True)
            self.unit = torch.where(norm > 0, self.mean_diff / norm.clamp_min(1e-300), torch.zeros_like(self.mean_diff))
        for name in ("mean_diff", "unit"):
            t = torch.as_tensor(getattr(self, name), dtype=torch.float64).cpu()
            setattr(self, name, t)
            if tuple(t.shape) != shape:
                raise InputError(f"{name} has shape {tuple(t.shape)}, expected {shape}.")

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_means(
        cls,
        harmful_mean: torch.Tensor,
        harmless_mean: torch.Tensor,
        layers: Sequence[int],
        positions: Sequence[int],
        n_harmful: int,
        n_harmless: int,
        n_layers: int | None = None,
        provenance: dict[str, Any] | None = None,
    ) -> "RefusalDirections":
        """Build from precomputed centroids [L, P, D] (e.g. synthetic tensors in tests)."""
        harmful_mean = torch.as_tensor(harmful_mean, dtype=torch.float64)
        d_model = int(harmful_mean.shape[-1])
        n_layers = int(n_layers) if n_layers is not None else (max(layers) + 1 if len(layers) else 0)
        prov = make_provenance(n_layers=n_layers, d_model=d_model, n_harmful=n_harmful, n_harmless=n_harmless)
        prov.update(provenance or {})
        return cls(
            harmful_mean=harmful_mean,
            harmless_mean=harmless_mean,
            layers=tuple(layers),
            positions=tuple(positions),
            n_harmful=int(n_harmful),
            n_harmless=int(n_harmless),
            n_layers=n_layers,
            d_model=d_model,
            provenance=prov,
        )

    @classmethod
    def from_datasets(
        cls, harmful_ds: Any, harmless_ds: Any, n_layers: int, provenance: dict[str, Any] | None = None
    ) -> "RefusalDirections":
        """Build from two collector outputs (`collect_activations(..., reduce="mean")`).

        Each dataset has var "sum" [layer, pos, d_model] float64 and scalar "count"; the mean
        is recomputed here as sum / count in float64. Coordinates must agree.
        """
        lay_h = [int(x) for x in harmful_ds["layer"].values]
        lay_s = [int(x) for x in harmless_ds["layer"].values]
        pos_h = [int(x) for x in harmful_ds["pos"].values]
        pos_s = [int(x) for x in harmless_ds["pos"].values]
        if lay_h != lay_s or pos_h != pos_s:
            raise InputError(
                f"Harmful and harmless activations have different coordinates (layers {lay_h} vs {lay_s}, "
                f"positions {pos_h} vs {pos_s}); collect both with the same layers/positions."
            )

        def mean_of(ds: Any, what: str) -> tuple[torch.Tensor, int]:
            count = int(ds["count"].values)
            if count <= 0:
                raise InputError(f"The {what} activations were collected from 0 prompts.")
            s = torch.from_numpy(ds["sum"].transpose("layer", "pos", ...).values.astype("float64"))
            return s / count, count

        mh, nh = mean_of(harmful_ds, "harmful")
        ms, ns = mean_of(harmless_ds, "harmless")
        return cls.from_means(mh, ms, lay_h, pos_h, nh, ns, n_layers=n_layers, provenance=provenance)

    @classmethod
    def extract(
        cls,
        mm: Any,
        harmful: Sequence[str],
        harmless: Sequence[str],
        *,
        layers: Sequence[int] | None = None,
        positions: Any = "post",
        batch_size: int = 8,
        seed: int | None = None,
        dataset_names: tuple[str, str] | None = None,
        remote: bool = False,
        progress: bool | None = None,
        share_head: bool = False,
    ) -> "RefusalDirections":
        """Extract directions from text prompts through the nnsight collector.

        mm: a MarsModel (`mars_core.load_model`). harmful / harmless: lists of user instructions
        (plain text; the chat template with the generation prompt is applied by the model).
        layers: decoder layers to read (default all). positions: "post" (every post-instruction
        column, the default) or what the collector accepts. seed: recorded in provenance (the
        extraction itself is deterministic; pass the seed that drew the prompt split).
        remote: run the traces on NDIF (nnsight `remote=True`). progress: a progress bar per side
        (default: for more than a few batches). share_head: run each batch's shared chat-template
        head once and read the rest over its key/value cache (local only; equal to full forwards
        within float tolerance, ~0.7x their time on SmolLM2; `collect_activations`); recorded as
        `head_tokens_shared` in the provenance.
        Returns float64 centroids/differences of shape [layer, pos, d_model].
        """
        from .capture import collect_activations  # lead's collector; imported lazily

        harmful = _check_prompts(harmful, "harmful")
        harmless = _check_prompts(harmless, "harmless")
        if batch_size < 1:
            raise InputError(f"batch_size must be >= 1, got {batch_size}.")
        kw = dict(layers=layers, positions=positions, reduce="mean", batch_size=batch_size, remote=remote,
                  progress=progress, share_head=share_head)
        ds_h = collect_activations(mm, harmful, **kw)
        ds_s = collect_activations(mm, harmless, **kw)
        fields: dict[str, Any] = dict(mm.provenance()) if hasattr(mm, "provenance") else {}
        for k in ("created", "mars_version"):
            fields.pop(k, None)
        fields.update(
            kind="refusal_directions",
            harmful_sha256=sha256_text(harmful),
            harmless_sha256=sha256_text(harmless),
            n_harmful=len(harmful),
            n_harmless=len(harmless),
            harmful_name=(dataset_names or ("", ""))[0],
            harmless_name=(dataset_names or ("", ""))[1],
            seed=seed,
            head_tokens_shared=int(ds_h.attrs["head_tokens_shared"]) + int(ds_s.attrs["head_tokens_shared"]),
            n_layers=int(mm.n_layers),
            d_model=int(mm.d_model),
            positions_spec=positions if isinstance(positions, str) else list(positions),
        )
        prov = make_provenance(**fields)
        return cls.from_datasets(ds_h, ds_s, n_layers=int(mm.n_layers), provenance=prov)

    # ------------------------------------------------------------------ access
    def _layer_index(self, layer: int) -> int:
        return layer_index(self.layers, self.n_layers, layer, "was not extracted")

    def _pos_index(self, pos: int) -> int:
        try:
            return self.positions.index(int(pos))
        except ValueError:
            raise InputError(
                f"Position {pos} was not extracted; available post-instruction positions: {list(self.positions)}."
            ) from None

    def direction(self, layer: int, pos: int = -1, unit: bool = True) -> torch.Tensor:
        """Direction at decoder layer `layer` (negative counts from the end) and column `pos`.

        Returns [d_model] float64: the unit vector if `unit`, else the raw mean difference.
        """
        i, j = self._layer_index(layer), self._pos_index(pos)
        t = self.unit if unit else self.mean_diff
        return t[i, j].clone()

    def centroids(self, layer: int, pos: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
        """(harmful centroid [d_model], harmless centroid [d_model]) float64 at (layer, pos)."""
        i, j = self._layer_index(layer), self._pos_index(pos)
        return self.harmful_mean[i, j].clone(), self.harmless_mean[i, j].clone()

    def norms(self) -> torch.Tensor:
        """||mean_diff|| per (layer, pos): [L, P] float64."""
        return self.mean_diff.norm(dim=-1)

    @property
    def fingerprint(self) -> str:
        """Content hash of the centroids, layers, positions, counts and model shape (not the
        provenance): equal directions have equal fingerprints."""
        from .provenance import fingerprint

        return fingerprint({"harmful_mean": self.harmful_mean, "harmless_mean": self.harmless_mean,
                            "layers": self.layers, "positions": self.positions,
                            "n": (self.n_harmful, self.n_harmless), "shape": (self.n_layers, self.d_model)})

    def to_xarray(self):
        """All tensors as a labeled xarray.Dataset (dims layer, pos, d_model); attrs provenance."""
        import xarray as xr

        coords = {"layer": list(self.layers), "pos": list(self.positions)}
        dims = ("layer", "pos", "d_model")
        return xr.Dataset(
            {
                "harmful_mean": (dims, self.harmful_mean.numpy()),
                "harmless_mean": (dims, self.harmless_mean.numpy()),
                "mean_diff": (dims, self.mean_diff.numpy()),
                "unit": (dims, self.unit.numpy()),
                "norm": (("layer", "pos"), self.norms().numpy()),
            },
            coords=coords,
            attrs=dict(self.provenance),
        )

    def __repr__(self) -> str:
        return (
            f"RefusalDirections(layers={len(self.layers)}/{self.n_layers}, positions={list(self.positions)}, "
            f"d_model={self.d_model}, n_harmful={self.n_harmful}, n_harmless={self.n_harmless}, "
            f"model={self.provenance.get('model_id', '')!r})"
        )

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | os.PathLike) -> Path:
        """Write a safetensors file atomically (tensors bit-exact; provenance as JSON metadata)."""
        tensors = {
            "harmful_mean": self.harmful_mean,
            "harmless_mean": self.harmless_mean,
            "mean_diff": self.mean_diff,
            "unit": self.unit,
            "layers": torch.tensor(self.layers, dtype=torch.int64),
            "positions": torch.tensor(self.positions, dtype=torch.int64),
        }
        meta = {"n_layers": str(self.n_layers), "d_model": str(self.d_model), "n_harmful": str(self.n_harmful),
                "n_harmless": str(self.n_harmless)}
        return save_tensor_file(path, tensors, meta, fmt=FORMAT_NAME, version=FORMAT_VERSION,
                                provenance=self.provenance)

    @classmethod
    def load(cls, path: str | os.PathLike, model: Any = None) -> "RefusalDirections":
        """Read a file written by `save`. If `model` (MarsModel, HF model or config) is given,
        raise IncompatibleModelError unless its layer count and d_model match; warn if its
        config hash differs while the shapes match. ArtifactError if the file is missing,
        unreadable or not a refusal-directions file."""
        path = Path(path)
        t, meta, prov = read_tensor_file(path, fmt=FORMAT_NAME, version=FORMAT_VERSION, what="refusal-directions",
                                         required=_TENSOR_KEYS)
        try:
            n_layers, d_model = int(meta["n_layers"]), int(meta["d_model"])
            n_harm, n_safe = int(meta["n_harmful"]), int(meta["n_harmless"])
        except (KeyError, ValueError) as e:
            raise ArtifactError(f"{path} has corrupt metadata: {e}") from e
        if model is not None:
            m_layers, m_d = _model_shape(model)
            if (m_layers, m_d) != (n_layers, d_model):
                raise IncompatibleModelError(
                    f"Refusal directions in {path} were extracted from a model with {n_layers} layers and "
                    f"d_model={d_model} (model {prov.get('model_id', '?')!r}), but the given model has "
                    f"{m_layers} layers and d_model={m_d}. Extract directions for this model with "
                    "RefusalDirections.extract."
                )
            want = prov.get("model_config_hash")
            have = getattr(model, "config_hash", None)
            if want and have and want != have:
                warnings.warn(
                    f"Refusal directions in {path} come from a model with config hash {want}, this model has "
                    f"{have}; shapes match, so they load, but they may not mean anything here.",
                    stacklevel=2,
                )
        return cls(
            harmful_mean=t["harmful_mean"],
            harmless_mean=t["harmless_mean"],
            mean_diff=t["mean_diff"],
            unit=t["unit"],
            layers=tuple(t["layers"].tolist()),
            positions=tuple(t["positions"].tolist()),
            n_harmful=n_harm,
            n_harmless=n_safe,
            n_layers=n_layers,
            d_model=d_model,
            provenance=prov,
        )
