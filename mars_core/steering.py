"""MARS, the modality-agnostic refusal-steering operator, and the baselines it is compared with.

All steerers share one interface (`Steerer`):

    with mm.nn.trace(batch.inputs):                      # or mm.nn.generate(..., max_new_tokens=k)
        rec = steerer.apply(mm, batch, record=True)      # edits through nnsight; returns saved values
        logits = nnsight.save(mm.logits_envoy.output[:, -1])

    out = steerer.generate(mm, texts, images=None, videos=None, max_new_tokens=32)
    out            # list[str], the generated continuations
    out.alpha      # [batch] the strength applied at the first generated token (MARS / ActAdd / AutoSteer)

Steerers: `NoSteer`, `ActAdd` (fixed strength), `DirectionalAblation`, `MARS`; `AutoSteer` lives in
`mars_core.autosteer`. The exact MARS equations are in docs/method.md and in `MARS`'s docstring;
`mars_strength` is their one implementation (pure torch, vectorised over the batch).

Everything here that runs inside a trace uses only torch and this package, so it works with
`remote=True` once the package is registered for by-value pickling: `nnsight.register(mars_core)`
(see `register_remote`).
"""

from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from nnsight.intervention.iterator import Iterations

from .errors import ArtifactError, IncompatibleModelError, InputError, MarsError
from .provenance import make_provenance, read_tensor_file, save_tensor_file, sha256_text
from .selection import project_out

SCOPES = ("first", "every")
OFFSET_MODES = ("judge", "subtract")
UNITS = ("gap", "abs")
MODALITIES = ("text", "image", "video")

CALIBRATION_FORMAT = "mars-calibration"
CALIBRATION_VERSION = "1"


def register_remote() -> None:
    """Register `mars_core` with nnsight so remote requests carry its code by value.

    NDIF servers do not have this package; `nnsight.register(mars_core)` makes every request
    that references a steerer ship the package's classes and functions as source. Call it once
    before `trace(..., remote=True)`. Idempotent.
    """
    import nnsight

    import mars_core

    nnsight.register(mars_core)


# ============================================================================ the math
def _unit(r: torch.Tensor) -> torch.Tensor:
    r = (r.detach() if isinstance(r, torch.Tensor) else torch.as_tensor(r, dtype=torch.float64)).to(torch.float64).flatten()
    n = r.norm()
    if not torch.isfinite(n) or float(n) == 0.0:
        raise InputError("the steering direction is zero or not finite; extract directions again")
    return r / n


def mars_strength(
    x: torch.Tensor,
    r: torch.Tensor,
    p_harm: float | torch.Tensor,
    p_safe: float | torch.Tensor,
    offset: torch.Tensor | None = None,
    *,
    recenter: bool = True,
    adaptive: bool = True,
    trust_region: bool = True,
    offset_mode: str = "judge",
    gain: float = 2.0,
    gain_units: str = "gap",
    tau: float = 0.5,
    margin: float = 0.5,
    alpha: float = 1.0,
) -> dict[str, torch.Tensor]:
    """The MARS equations for a batch of activations (see docs/method.md, section 2).

    x: [batch, d_model] activations at the intervention layer, last prompt position (any float
    dtype, any device). r: [d_model] unit direction. p_harm, p_safe: projections of the text
    harmful / harmless centroids on r (p_harm > p_safe). offset: [d_model] modality offset o_m
    (None or zeros for text). Everything is computed in float64 on x's device.

    Returns a dict of [batch] float64 tensors:
      proj   x . r                                      (raw projection)
      proj_c x_c . r, x_c = x - o_m if recenter else x  (the judged projection)
      score  s = (proj_c - p_safe) / (p_harm - p_safe)
      cap    alpha_max = relu(p_harm + margin * Delta - b . r), b = x_c if offset_mode ==
             "subtract" and recenter else x  (inf when trust_region is off)
      alpha  adaptive:  min(g * relu(s - tau), cap),  g = gain * Delta (gain_units "gap") or gain
             fixed:     min(alpha, cap)   (alpha = const; with trust_region off this is ActAdd)
    and "delta" [batch, d_model] float64: the vector added to x (alpha r, minus o_m in
    "subtract" mode with recenter on).
    """
    if offset_mode not in OFFSET_MODES:
        raise InputError(f"offset_mode={offset_mode!r}; use one of {OFFSET_MODES}")
    if gain_units not in UNITS:
        raise InputError(f"gain_units={gain_units!r}; use one of {UNITS}")
    wd, dev = torch.float64, x.device
    xf = x.detach().to(wd)
    # as_tensor(float) would make float32: give the dtype up front so nothing is rounded
    rf = torch.as_tensor(r, dtype=wd, device=dev)
    ph = torch.as_tensor(p_harm, dtype=wd, device=dev)
    ps = torch.as_tensor(p_safe, dtype=wd, device=dev)
    gap = ph - ps
    proj = xf @ rf  # [batch]
    use_offset = recenter and offset is not None
    if use_offset:
        of = torch.as_tensor(offset, dtype=wd, device=dev)
        proj_c = proj - of @ rf
    else:
        of = None
        proj_c = proj
    score = (proj_c - ps) / gap
    subtract = use_offset and offset_mode == "subtract"
    base_proj = proj_c if subtract else proj
    if trust_region:
        cap = torch.relu(ph + margin * gap - base_proj)
    else:
        cap = torch.full_like(proj, math.inf)
    if adaptive:
        g = gain * gap if gain_units == "gap" else torch.as_tensor(gain, dtype=wd, device=dev)
        raw = g * torch.relu(score - tau)
    else:
        raw = torch.full_like(proj, float(alpha))
    a = torch.minimum(raw, cap)
    delta = a[:, None] * rf[None, :]
    if subtract:
        delta = delta - of[None, :]
    return {"proj": proj, "proj_c": proj_c, "score": score, "cap": cap, "alpha": a, "delta": delta}


def _add(x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """x + delta, summed in float64, returned in x's dtype."""
    return (x.to(torch.float64) + delta.to(device=x.device, dtype=torch.float64)).to(x.dtype)


def _layers_of(target: Any, layers_path: str | None):
    """The decoder-layer Envoy list of a MarsModel, or of a bare nnsight model via layers_path."""
    if hasattr(target, "layers") and hasattr(target, "nn"):
        return target.layers
    if layers_path is None:
        raise InputError(
            "apply() got a bare nnsight model but the steerer does not know where its decoder "
            "layers are; pass the MarsModel, or set steerer.layers_path (e.g. 'model.language_model.layers')"
        )
    obj = target
    for part in layers_path.split("."):
        obj = getattr(obj, part)
    return obj


def _modality_of(batch: Any) -> str:
    if batch is None:
        return "text"
    if isinstance(batch, str):
        m = batch
    else:
        m = getattr(batch, "modality", "text")
    if m not in MODALITIES:
        raise InputError(f"modality {m!r}; use one of {MODALITIES}")
    return m


def _check_steps(scope: str, steps: int | None) -> int:
    if scope not in SCOPES:
        raise InputError(f"scope={scope!r}; use one of {SCOPES}")
    if scope == "first":
        return 1
    if steps is None:
        raise InputError(
            "scope='every' edits every forward pass, so apply() needs steps: max_new_tokens inside "
            "mm.nn.generate(...), 1 inside a plain mm.nn.trace(...)"
        )
    steps = int(steps)
    if steps < 1:
        raise InputError(f"steps={steps}; must be >= 1")
    return steps


def _new_record(record: Any) -> dict | None:
    """A saved dict to fill, or None. `record` is False/None, True, or a dict the caller saved."""
    if record is None or record is False:
        return None
    if isinstance(record, dict):
        return record
    import nnsight

    return nnsight.save({})


# ============================================================================ steerers
class Steerer:
    """Common interface of every steering method.

    apply(mm, batch=None, *, steps=None, record=False)
        Call INSIDE the caller's `mm.nn.trace(...)` / `mm.nn.generate(...)` block, before any
        read of a later layer (nnsight requires edits in forward order) and outside any
        `tracer.iter` loop. `mm` is the MarsModel (or the bare nnsight model when the steerer
        has `layers_path`); `batch` the PromptBatch (or its modality string, "text" if None).
        `steps`: number of forward passes to edit for per-step methods (max_new_tokens inside
        generate, 1 inside a trace); ignored by first-token methods.
        `record`: False records nothing; True returns a saved dict of per-row values (e.g.
        "alpha", "score"); a dict you created with `nnsight.save({})` is filled in place, which
        survives even when a generation ends before `steps` (nnsight then skips the statements
        after the step loop, including apply's return).
    step(mm, batch=None, *, record=None)
        Edit only the forward pass nnsight is at now. Use it inside your own
        `for _ in tracer.iter[:k]:` loop when you also read per-step values: nnsight allows one
        per-step loop per invoke, and apply(steps=k) runs its own (alternatively, put the
        reads in a second `tracer.invoke()`, which sees the edits).
    generate(mm, texts, images=None, videos=None, max_new_tokens=32, *, batch_size=None, remote=False,
             **generate_kwargs)
        Steered generation -> `Generations` (a list of strings with `.alpha`, `.record`,
        `.token_ids`), one padded batch, or chunks of `batch_size` prompts. Greedy unless
        generate_kwargs say otherwise.
    last_logits(mm, batch, *, remote=False) -> (logits [batch, vocab] float32, record dict)
        One steered forward; the next-token logits at the last prompt column.
    """

    name = "steerer"
    scope = "first"
    layers_path: str | None = None
    edits_last_position_only = True  # with scope "first": only the last prompt column is edited

    def apply(self, mm: Any, batch: Any = None, *, steps: int | None = None, record: Any = False):
        steps = _check_steps(self.scope, steps)
        rec = _new_record(record)
        self.step(mm, batch, record=rec)
        if steps > 1:
            for _ in Iterations()[1:steps]:
                self.step(mm, batch, record=rec)
        return rec

    def step(self, mm: Any, batch: Any = None, *, record: dict | None = None) -> None:
        """Edit the forward pass nnsight is at now (prefill, or the step of an enclosing
        `for _ in tracer.iter[...]` loop). apply() calls it once ("first") or once per step
        ("every"); call it yourself inside your own step loop when you also read per-step values
        (nnsight allows one per-step loop per invoke)."""
        raise NotImplementedError

    # -- conveniences -------------------------------------------------------------------------
    def last_logits(self, mm: Any, batch: Any, *, remote: bool | str = False) -> tuple[torch.Tensor, dict]:
        import nnsight

        if remote:
            register_remote()
        with torch.no_grad():
            with mm.nn.trace(batch.inputs, remote=remote):
                rec = nnsight.save({})
                self.apply(mm, batch, steps=1, record=rec)
                logits = nnsight.save(mm.logits_envoy.output[:, -1])
        return logits.detach().float().cpu(), _to_cpu(rec)

    def generate(
        self,
        mm: Any,
        texts: Sequence[str],
        images: Sequence[Any] | None = None,
        videos: Sequence[Any] | None = None,
        max_new_tokens: int = 32,
        *,
        batch_size: int | None = None,
        remote: bool | str = False,
        **generate_kwargs: Any,
    ) -> "Generations":
        import nnsight

        texts = list(texts)
        if batch_size is not None and len(texts) > int(batch_size):
            return self._generate_chunked(mm, texts, images, videos, max_new_tokens, int(batch_size), remote,
                                          generate_kwargs)
        if remote:
            register_remote()
        batch = mm.build_batch(texts, images=images, videos=videos)
        generate_kwargs.setdefault("do_sample", False)
        k = int(max_new_tokens)
        with torch.no_grad(), warnings.catch_warnings():
            # A per-step loop bounded at k steps is cut short (with this warning) when every row
            # stops early; the record is filled in place, so nothing is lost.
            warnings.filterwarnings("ignore", message=".*was never reached.*")
            with mm.nn.generate(max_new_tokens=k, remote=remote, **generate_kwargs) as tracer:
                with tracer.invoke(batch.inputs):
                    rec = nnsight.save({})
                    self.apply(mm, batch, steps=k, record=rec)
                with tracer.invoke():
                    ids = nnsight.save(tracer.result)
        new = ids[:, batch.seq_len :].cpu()
        tok = mm.tokenizer
        outs = tok.batch_decode(new, skip_special_tokens=True)
        rec = _to_cpu(rec)
        return Generations(outs, token_ids=new, record=rec, alpha=rec.get("alpha"))

    def _generate_chunked(self, mm, texts, images, videos, k, bs, remote, kw) -> "Generations":
        """generate() over chunks of `bs` prompts: strings and per-row tensors concatenated, token
        ids right-padded with the pad id; `.record["chunks"]` keeps each chunk's record."""
        parts = []
        for s in range(0, len(texts), bs):
            sl = slice(s, s + bs)
            parts.append(self.generate(mm, texts[sl], None if images is None else list(images)[sl],
                                       None if videos is None else list(videos)[sl], k, remote=remote, **kw))
        width = max(p.token_ids.shape[1] for p in parts)
        pad = mm.tokenizer.pad_token_id if mm.tokenizer.pad_token_id is not None else 0
        ids = torch.cat([torch.nn.functional.pad(p.token_ids, (0, width - p.token_ids.shape[1]), value=pad)
                         for p in parts])
        rec: dict[str, Any] = {"chunks": [p.record for p in parts]}
        for key, v in parts[0].record.items():
            if isinstance(v, torch.Tensor) and all(isinstance(p.record.get(key), torch.Tensor) for p in parts):
                rec[key] = torch.cat([p.record[key] for p in parts])
        return Generations([t for p in parts for t in p], token_ids=ids, record=rec, alpha=rec.get("alpha"))

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Generations(list):
    """A list of generated strings, with `.alpha` ([batch] strength at the first generated token
    or None), `.record` (what apply recorded) and `.token_ids` ([batch, new_tokens])."""

    def __init__(self, texts, *, token_ids=None, record=None, alpha=None):
        super().__init__(texts)
        self.token_ids = token_ids
        self.record = record or {}
        self.alpha = alpha


def _to_cpu(rec: dict | None) -> dict:
    out = {}
    for k, v in (rec or {}).items():
        if isinstance(v, torch.Tensor):
            out[k] = v.detach().cpu()
        elif isinstance(v, list):
            out[k] = [t.detach().cpu() if isinstance(t, torch.Tensor) else t for t in v]
        else:
            out[k] = v
    return out


class NoSteer(Steerer):
    """No intervention (the unsteered model), with the steerer interface."""

    name = "none"

    def step(self, mm, batch=None, *, record=None):
        return None


class ActAdd(Steerer):
    """Activation addition with a fixed strength: x' = x + alpha * r at one layer.

    direction: [d_model] (normalised to a unit vector r). alpha: strength in residual-stream
    units (the change of x . r). scope "first": only the last prompt position at prefill (the
    first generated token); "every": that and every generated position at each later step.
    `from_directions` builds it from RefusalDirections with alpha = coeff * ||mean_diff||.
    """

    name = "actadd"

    def __init__(self, direction: torch.Tensor, layer: int, alpha: float, *, scope: str = "first",
                 layers_path: str | None = None):
        _check_steps(scope, 1)
        self.r = _unit(direction)
        self.layer = int(layer)
        self.alpha = float(alpha)
        self.scope = scope
        self.layers_path = layers_path

    @classmethod
    def from_directions(cls, directions: Any, layer: int, coeff: float = 1.0, *, pos: int = -1,
                        scope: str = "first", layers_path: str | None = None) -> "ActAdd":
        v = directions.direction(layer, pos, unit=False)
        return cls(v, layer % directions.n_layers, coeff * float(v.norm()), scope=scope, layers_path=layers_path)

    def step(self, mm, batch=None, *, record=None):
        layers = _layers_of(mm, self.layers_path)
        out = layers[self.layer].output
        x = out[:, -1]
        a = torch.full((x.shape[0],), self.alpha, dtype=torch.float64, device=x.device)
        layers[self.layer].output[:, -1] = _add(x, a[:, None] * self.r.to(x.device)[None, :])
        if record is not None:
            record.setdefault("alpha", a.cpu())
            record.setdefault("alpha_steps", []).append(a.cpu())

    def __repr__(self):
        return f"ActAdd(layer={self.layer}, alpha={self.alpha:.4g}, scope={self.scope!r})"


class DirectionalAblation(Steerer):
    """Directional ablation (Arditi et al. 2024): x' = x - (x . r) r on the input of layer 0 and
    the output of every decoder layer, at every position, at every forward pass (scope "every":
    pass steps=max_new_tokens inside generate). This removes refusal; it is the bypass baseline.
    Uses `mars_core.selection.ablate_direction` (same edit as direction selection)."""

    name = "ablation"
    edits_last_position_only = False

    def __init__(self, direction: torch.Tensor, *, include_embeddings: bool = True, scope: str = "every",
                 layers_path: str | None = None):
        _check_steps(scope, 1)
        self.r = _unit(direction)
        self.include_embeddings = bool(include_embeddings)
        self.scope = scope
        self.layers_path = layers_path

    def step(self, mm, batch=None, *, record=None):
        layers = _layers_of(mm, self.layers_path)
        r = self.r
        if self.include_embeddings:
            layers[0].input = project_out(layers[0].input, r)
        for i in range(len(layers)):
            layers[i].output[:] = project_out(layers[i].output, r)


    def __repr__(self):
        return f"DirectionalAblation(scope={self.scope!r}, include_embeddings={self.include_embeddings})"


# ============================================================================ calibration
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
      provenance  flat dict (model id, directions' provenance, neutral-set hashes, seed, version)
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
        prov.setdefault("model_id", dprov.get("model_id", ""))
        return cls(layers, r, p_harm, p_safe, dict(offsets or {}), int(directions.n_layers), int(directions.d_model),
                   pos=pos, layers_path=layers_path, provenance=make_provenance(**prov))

    # -- access --------------------------------------------------------------------------------
    def index(self, layer: int) -> int:
        layer = int(layer)
        if layer < 0:
            layer += self.n_layers
        try:
            return self.layers.index(layer)
        except ValueError:
            raise InputError(f"layer {layer} is not calibrated; calibrated layers: {list(self.layers)}") from None

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

    def check_model(self, model: Any) -> None:
        """IncompatibleModelError unless `model` has this calibration's layer count and d_model."""
        from .directions import _model_shape

        m_layers, m_d = _model_shape(model)
        if (m_layers, m_d) != (self.n_layers, self.d_model):
            raise IncompatibleModelError(
                f"this MARS calibration is for a model with {self.n_layers} layers and d_model="
                f"{self.d_model} (model {self.provenance.get('model_id', '?')!r}); the given model has "
                f"{m_layers} layers and d_model={m_d}. Calibrate for this model with calibrate_mars"
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


# -- neutral inputs ----------------------------------------------------------------------------
NEUTRAL_REQUESTS: dict[str, tuple[str, ...]] = {
    "image": (
        "Describe this image.",
        "What do you see in this picture?",
        "Give a short caption for this image.",
        "What colours are in this image?",
    ),
    "video": (
        "Describe this video.",
        "What happens in this video?",
        "Give a short caption for this video.",
        "What colours are in this video?",
    ),
}
"""Benign generic requests paired with neutral media. The text baseline of modality m uses the
same request strings without media, so o_m isolates the effect of the media tokens."""


def image_side(mm: Any, default: int = 224) -> int:
    """Side (px) of a square image at the model's native resolution, read from its image processor.

    crop_size, else size height/width, else size shortest_edge. Qwen-VL style processors (with
    `merge_size`) give shortest_edge as a pixel COUNT (min_pixels): the side is its square root.
    """
    ip = getattr(getattr(mm, "processor", None), "image_processor", None)
    if ip is None:
        return default

    def get(d, k):
        if d is None:
            return None
        return d.get(k) if isinstance(d, dict) else getattr(d, k, None)

    crop = getattr(ip, "crop_size", None)
    if get(crop, "height") and get(crop, "width"):
        return int(get(crop, "height"))
    size = getattr(ip, "size", None)
    if get(size, "height") and get(size, "width"):
        return int(get(size, "height"))
    se = get(size, "shortest_edge")
    if se:
        if getattr(ip, "merge_size", None) is not None:
            return int(math.ceil(math.sqrt(int(se))))
        return int(se)
    return default


def neutral_images(n: int, size: int, seed: int = 0) -> list[np.ndarray]:
    """n neutral images [size, size, 3] uint8: even indices a random solid colour, odd uniform noise."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        if i % 2 == 0:
            img = np.broadcast_to(rng.integers(0, 256, size=(1, 1, 3), dtype=np.uint8), (size, size, 3)).copy()
        else:
            img = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
        out.append(img)
    return out


def neutral_videos(n: int, size: int, frames: int = 4, seed: int = 0) -> list[np.ndarray]:
    """n neutral videos [frames, size, size, 3] uint8: even indices blank (one random colour),
    odd independent uniform-noise frames."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        if i % 2 == 0:
            c = rng.integers(0, 256, size=(1, 1, 1, 3), dtype=np.uint8)
            v = np.broadcast_to(c, (frames, size, size, 3)).copy()
        else:
            v = rng.integers(0, 256, size=(frames, size, size, 3), dtype=np.uint8)
        out.append(v)
    return out


def neutral_inputs(mm: Any, modality: str, n: int = 8, *, seed: int = 0, image_size: int | None = None,
                   frames: int = 4, requests: Sequence[str] | None = None) -> dict[str, Any]:
    """Neutral inputs of `modality`: {"texts": [...], "images"|"videos": [...]} (texts only for "text"
    needs `requests`). Requests cycle through NEUTRAL_REQUESTS[modality] unless given."""
    if modality not in ("image", "video"):
        raise InputError(f"neutral inputs are made for 'image' or 'video', not {modality!r}")
    reqs = list(requests or NEUTRAL_REQUESTS[modality])
    texts = [reqs[i % len(reqs)] for i in range(n)]
    side = image_size or image_side(mm)
    if modality == "image":
        return {"texts": texts, "images": neutral_images(n, side, seed)}
    return {"texts": texts, "videos": neutral_videos(n, side, frames, seed)}


def _supported_modalities(mm: Any) -> tuple[str, ...]:
    out = []
    if getattr(mm, "supports_image", False):
        out.append("image")
    if getattr(mm, "supports_video", False):
        out.append("video")
    return tuple(out)


def _last_means(mm: Any, texts, images=None, videos=None, layers=None, batch_size: int = 8) -> torch.Tensor:
    """Mean residual stream at the last prompt column, [L, D] float64, via collect_activations."""
    from .capture import collect_activations

    ds = collect_activations(mm, texts, images=images, videos=videos, layers=layers, positions="last",
                             reduce="mean", batch_size=batch_size, progress=False)
    return torch.from_numpy(ds["mean"].sel(pos=-1).values).to(torch.float64)


def calibrate_mars(mm: Any, directions: Any, *, modalities: Sequence[str] | None = None, n_neutral: int = 8,
                   seed: int = 0, pos: int = -1, layers: Sequence[int] | None = None, batch_size: int = 8,
                   image_size: int | None = None, frames: int = 4) -> MarsCalibration:
    """Build a MarsCalibration for `mm` from text RefusalDirections and neutral inputs.

    For each modality m (default: every one the model takes), o_m = mean over n_neutral neutral m
    inputs (random solid-colour / noise images at the model's resolution, blank / noise videos,
    each with a benign generic request) minus the mean over the same requests as text only, at
    the last prompt position of every calibrated layer. No unsafe data is needed.
    """
    from .directions import _model_shape

    if _model_shape(mm) != (int(directions.n_layers), int(directions.d_model)):
        raise IncompatibleModelError(
            f"the directions are for {directions.n_layers} layers / d_model={directions.d_model}, the model "
            f"has {mm.n_layers} / {mm.d_model}; extract directions for this model"
        )
    if pos != -1:
        raise InputError("MARS steers the last prompt position; calibrate with pos=-1")
    lay = tuple(directions.layers if layers is None else sorted({int(l) % mm.n_layers for l in layers}))
    mods = tuple(_supported_modalities(mm) if modalities is None else modalities)
    offsets, hashes = {}, {}
    for m in mods:
        if m == "text":
            continue
        if m not in ("image", "video"):
            raise InputError(f"modality {m!r}; use 'image' or 'video'")
        neu = neutral_inputs(mm, m, n_neutral, seed=seed, image_size=image_size, frames=frames)
        mean_m = _last_means(mm, neu["texts"], images=neu.get("images"), videos=neu.get("videos"), layers=list(lay),
                             batch_size=batch_size)
        mean_t = _last_means(mm, neu["texts"], layers=list(lay), batch_size=batch_size)
        offsets[m] = mean_m - mean_t
        hashes[f"neutral_{m}_texts_sha256"] = sha256_text(neu["texts"])
    prov = dict(
        model_id=getattr(mm, "model_id", ""),
        n_neutral=n_neutral,
        seed=seed,
        image_size=image_size or image_side(mm),
        video_frames=frames,
        **hashes,
    )
    return MarsCalibration.from_directions(directions, offsets, pos=pos, layers=lay,
                                           layers_path=getattr(getattr(mm, "family", None), "layers_path", None),
                                           provenance=prov)


def neutral_calibration(mm: Any, directions: Any, neutral_text: Any, neutral_media: dict[str, Any], *,
                        batch_size: int = 8) -> MarsCalibration:
    """MarsCalibration from prompt sets you choose (e.g. requests in a model's own vocabulary):
    o_m = mean(neutral_media[m]) - mean(neutral_text) at the last prompt position of every layer.

    neutral_text: PromptSet of benign requests without media; neutral_media: {modality: PromptSet
    of benign requests with neutral images/videos}. No unsafe data is involved.
    """
    from .directions import _model_shape

    if _model_shape(mm) != (int(directions.n_layers), int(directions.d_model)):
        raise IncompatibleModelError(
            f"the directions are for {directions.n_layers} layers / d_model={directions.d_model}, the model "
            f"has {mm.n_layers} / {mm.d_model}; extract directions for this model"
        )
    mean_t = _last_means(mm, neutral_text.texts, batch_size=batch_size)
    offsets, prov = {}, {"model_id": getattr(mm, "model_id", ""), **neutral_text.provenance()}
    for m, ps in neutral_media.items():
        offsets[m] = _last_means(mm, ps.texts, **ps.media_kwargs(), batch_size=batch_size) - mean_t
        prov.update(ps.provenance())
    return MarsCalibration.from_directions(directions, offsets, layers_path=mm.family.layers_path, provenance=prov)


# ============================================================================ MARS
class MARS(Steerer):
    r"""Modality-Agnostic Refusal Steering at one decoder layer l (docs/method.md).

    With the text unit direction r, p_harm = mu_harm . r, p_safe = mu_safe . r,
    Delta = p_harm - p_safe > 0 and the modality offset o_m (o_text = 0), for each row's
    activation x at the last prompt position:

        x_c     = x - o_m                     if recenter else x
        s       = (x_c . r - p_safe) / Delta  (0 at the harmless centroid, 1 at the harmful one)
        b       = x_c if (offset_mode == "subtract" and recenter) else x
        cap     = max(0, p_harm + margin * Delta - b . r)     if trust_region else +inf
        alpha   = min(g * max(0, s - tau), cap)               if adaptive  (g = gain * Delta,
                                                               or gain when gain_units="abs")
                  min(alpha_fixed, cap)                        otherwise (fixed strength)
        x'      = b + alpha * r

    alpha is in residual-stream units (r is unit, so x' . r = b . r + alpha); the trust region
    guarantees x' . r <= max(b . r, p_harm + margin * Delta). With adaptive on, alpha is exactly 0
    whenever s <= tau (the ReLU gate). With adaptive and trust_region off, MARS is ActAdd with
    strength alpha_fixed.

    Switches: recenter (judge x after removing o_m), adaptive (gated strength vs fixed),
    trust_region (cap), offset_mode ("judge": o_m only judges, the stream keeps x; "subtract":
    the stream continues from x_c), scope ("first": prefill only, last prompt position, so
    only the first generated token is steered directly; "every": the same operator is evaluated
    afresh at the new position of every later step too).
    """

    name = "mars"

    def __init__(self, calibration: MarsCalibration, layer: int, *, recenter: bool = True, adaptive: bool = True,
                 trust_region: bool = True, offset_mode: str = "judge", scope: str = "first", gain: float = 2.0,
                 gain_units: str = "gap", tau: float = 0.5, margin: float = 0.5, alpha: float = 1.0,
                 layers_path: str | None = None):
        _check_steps(scope, 1)
        if offset_mode not in OFFSET_MODES:
            raise InputError(f"offset_mode={offset_mode!r}; use one of {OFFSET_MODES}")
        if gain_units not in UNITS:
            raise InputError(f"gain_units={gain_units!r}; use one of {UNITS}")
        if margin < 0 or gain < 0:
            raise InputError("gain and margin must be >= 0")
        at = calibration.at(layer)
        self.layer = calibration.layers[calibration.index(layer)]
        self.r = at["r"]
        self.p_harm, self.p_safe = at["p_harm"], at["p_safe"]
        self.offsets = at["offsets"]
        self.recenter, self.adaptive, self.trust_region = bool(recenter), bool(adaptive), bool(trust_region)
        self.offset_mode, self.scope = offset_mode, scope
        self.gain, self.gain_units, self.tau, self.margin, self.alpha = float(gain), gain_units, float(tau), float(margin), float(alpha)
        self.layers_path = layers_path or calibration.layers_path
        self.selection = None  # xarray Dataset when built by MARS.select

    @property
    def config(self) -> dict[str, Any]:
        return dict(layer=self.layer, recenter=self.recenter, adaptive=self.adaptive, trust_region=self.trust_region,
                    offset_mode=self.offset_mode, scope=self.scope, gain=self.gain, gain_units=self.gain_units,
                    tau=self.tau, margin=self.margin, alpha=self.alpha)

    def strength(self, x: torch.Tensor, modality: str = "text") -> dict[str, torch.Tensor]:
        """`mars_strength` for activations x [batch, d_model] of `modality` at this layer."""
        if modality != "text" and self.recenter and modality not in self.offsets:
            raise InputError(
                f"no {modality} offset in the calibration (has {list(self.offsets)}); calibrate that "
                "modality, or use recenter=False"
            )
        return mars_strength(
            x, self.r, self.p_harm, self.p_safe, self.offsets.get(modality),
            recenter=self.recenter, adaptive=self.adaptive, trust_region=self.trust_region,
            offset_mode=self.offset_mode, gain=self.gain, gain_units=self.gain_units, tau=self.tau,
            margin=self.margin, alpha=self.alpha,
        )

    def step(self, mm, batch=None, *, record=None):
        layers = _layers_of(mm, self.layers_path)
        out = layers[self.layer].output
        x = out[:, -1]
        res = self.strength(x, _modality_of(batch))
        layers[self.layer].output[:, -1] = _add(x, res["delta"])
        if record is not None:
            if "alpha" not in record:  # the first step edited: the first generated token
                for k in ("alpha", "score", "proj", "proj_c", "cap"):
                    record[k] = res[k].cpu()
            record.setdefault("alpha_steps", []).append(res["alpha"].cpu())

    @classmethod
    def select(cls, mm: Any, calibration: MarsCalibration, harmful_texts: Sequence[str], **kwargs) -> "MARS":
        """MARS at the layer chosen by `select_mars_layer` (kwargs go there and to MARS); the
        criteria Dataset is kept in `.selection`."""
        mars_kw = {k: kwargs.pop(k) for k in list(kwargs) if k in _MARS_KWARGS}
        layer, ds = select_mars_layer(mm, calibration, harmful_texts, mars_kwargs=mars_kw, **kwargs)
        st = cls(calibration, layer, **mars_kw)
        st.selection = ds
        return st

    def __repr__(self):
        c = self.config
        return "MARS(" + ", ".join(f"{k}={v!r}" for k, v in c.items()) + ")"


_MARS_KWARGS = ("recenter", "adaptive", "trust_region", "offset_mode", "scope", "gain", "gain_units", "tau", "margin",
                "alpha", "layers_path")


# ============================================================================ layer selection
def select_mars_layer(
    mm: Any,
    calibration: MarsCalibration,
    harmful_texts: Sequence[str],
    *,
    neutral: dict[str, dict[str, Any]] | None = None,
    layers: Sequence[int] | None = None,
    layer: int | None = None,
    spurious_bound: float = 0.5,
    prune_layer_frac: float = 0.2,
    n_neutral: int = 8,
    seed: int = 1,
    refusal_ids: Sequence[int] | None = None,
    batch_size: int = 8,
    mars_kwargs: dict[str, Any] | None = None,
):
    """Choose MARS's intervention layer from text-only data and neutral multimodal inputs.

    For every candidate layer l (default: every calibrated layer; those at or above
    floor(n_layers * (1 - prune_layer_frac)) are evaluated but not eligible), MARS at l (with `mars_kwargs`; scored with `first_token_sweep`, so a
    batch costs one prefill plus one single-token forward per layer) is run on
      - the harmful text prompts: induced[l] = mean first-token refusal log-odds, and
      - neutral inputs of each calibrated modality m (default: fresh neutral images/videos drawn
        with `seed`, n_neutral each): spurious[m, l] = mean refusal log-odds, and
        spurious_delta[m, l] = spurious[m, l] - the unsteered mean on the same inputs.
    Feasible layers: pass_layer and max_m spurious_delta[m, l] <= spurious_bound. The chosen layer
    maximises induced among feasible layers (lowest layer on ties); if none is feasible the layer
    with the smallest max spurious_delta is chosen and attrs["fallback"] says so (with a warning).
    A given `layer` overrides: only it is evaluated and it is returned.

    Returns (layer, xarray.Dataset) with vars induced, induced_base, alpha_harmful, gate_harmful,
    score_harmful [layer]; spurious, spurious_base, spurious_delta, alpha_neutral, gate_neutral,
    score_neutral [modality, layer]; pass_layer, pass_spurious, feasible [layer]; attrs with the
    choice, the bound and provenance.
    """
    import xarray as xr

    from .scoring import first_token_refusal_score, refusal_token_ids

    calibration.check_model(mm)
    mars_kwargs = dict(mars_kwargs or {})
    harmful_texts = list(harmful_texts)
    if not harmful_texts:
        raise InputError("select_mars_layer needs harmful text prompts")
    if refusal_ids is None:
        refusal_ids = refusal_token_ids(mm.tokenizer)
    cut = int(math.floor(mm.n_layers * (1.0 - prune_layer_frac)))
    if layer is not None:
        cand = [calibration.layers[calibration.index(layer)]]
    elif layers is not None:
        cand = [calibration.layers[calibration.index(l)] for l in layers]
    else:
        cand = list(calibration.layers)
    mods = list(calibration.modalities)
    if neutral is None:
        neutral = {m: neutral_inputs(mm, m, n_neutral, seed=seed) for m in mods}
    mods = [m for m in mods if m in neutral]

    def batches(texts, images=None, videos=None):
        out = []
        for s in range(0, len(texts), batch_size):
            sl = slice(s, s + batch_size)
            out.append(mm.build_batch(texts[sl], images=None if images is None else list(images)[sl],
                                      videos=None if videos is None else list(videos)[sl]))
        return out

    steerers = [NoSteer()] + [MARS(calibration, l, **mars_kwargs) for l in cand]

    def run(bs):
        """For [no steering] + MARS at each candidate: mean refusal log-odds, mean alpha, gate
        rate, mean s over the batches (one shared-prefix sweep per batch)."""
        n = len(steerers)
        scores, alphas, ss = [[] for _ in range(n)], [[] for _ in range(n)], [[] for _ in range(n)]
        for b in bs:
            logits, recs = first_token_sweep(mm, b, steerers)
            for j in range(n):
                scores[j].append(first_token_refusal_score(logits[j], refusal_ids))
                if "alpha" in recs[j]:
                    alphas[j].append(recs[j]["alpha"].to(torch.float64))
                    ss[j].append(recs[j]["score"].to(torch.float64))
        out = []
        for j in range(n):
            sc = torch.cat(scores[j])
            al = torch.cat(alphas[j]) if alphas[j] else torch.zeros_like(sc)
            s_ = torch.cat(ss[j]) if ss[j] else torch.full_like(sc, float("nan"))
            out.append((float(sc.mean()), float(al.mean()), float((al > 0).double().mean()), float(s_.mean())))
        return out

    harm_b = batches(harmful_texts)
    neu_b = {m: batches(neutral[m]["texts"], neutral[m].get("images"), neutral[m].get("videos")) for m in mods}
    L, M = len(cand), len(mods)
    res_h = run(harm_b)
    res_n = [run(neu_b[m]) for m in mods]
    induced_base = res_h[0][0]
    spurious_base = np.array([r[0][0] for r in res_n])
    induced, a_h, g_h, s_h = (np.array([r[k] for r in res_h[1:]]) for k in range(4))
    spur, a_n, g_n, s_n = (np.array([[r[k] for r in rn[1:]] for rn in res_n]).reshape(M, L) for k in range(4))
    spur_delta = spur - spurious_base[:, None]
    worst = spur_delta.max(0) if M else np.zeros(L)
    pass_layer = np.array([l < cut for l in cand]) if layer is None else np.ones(L, bool)
    pass_spur = worst <= spurious_bound
    feasible = pass_layer & pass_spur
    fallback = ""
    if layer is not None:
        chosen = cand[0]
        fallback = "layer given by the caller"
    elif feasible.any():
        chosen = cand[int(np.argmax(np.where(feasible, induced, -np.inf)))]
    else:
        pool = pass_layer if pass_layer.any() else np.ones(L, bool)
        chosen = cand[int(np.argmin(np.where(pool, worst, np.inf)))]
        fallback = (f"no layer kept neutral spurious refusal within +{spurious_bound}; chose the layer with "
                    "the smallest spurious increase")
        warnings.warn(f"select_mars_layer: {fallback} (layer {chosen})", stacklevel=2)

    ds = xr.Dataset(
        {
            "induced": (("layer",), induced),
            "alpha_harmful": (("layer",), a_h),
            "gate_harmful": (("layer",), g_h),
            "score_harmful": (("layer",), s_h),
            "spurious": (("modality", "layer"), spur),
            "spurious_delta": (("modality", "layer"), spur_delta),
            "alpha_neutral": (("modality", "layer"), a_n),
            "gate_neutral": (("modality", "layer"), g_n),
            "score_neutral": (("modality", "layer"), s_n),
            "spurious_base": (("modality",), spurious_base),
            "induced_base": ((), induced_base),
            "pass_layer": (("layer",), pass_layer),
            "pass_spurious": (("layer",), pass_spur),
            "feasible": (("layer",), feasible),
        },
        coords={"layer": cand, "modality": mods},
        attrs=make_provenance(
            selected_layer=int(chosen),
            fallback=fallback,
            spurious_bound=float(spurious_bound),
            layer_cut=cut,
            prune_layer_frac=float(prune_layer_frac),
            harmful_sha256=sha256_text(harmful_texts),
            n_harmful=len(harmful_texts),
            mars_kwargs=json.dumps(mars_kwargs, sort_keys=True, default=str),
            model_id=getattr(mm, "model_id", ""),
        ),
    )
    return int(chosen), ds


# ============================================================================ fast first-token sweeps
def _prefix_positions(mm: Any, inputs: dict) -> torch.Tensor | None:
    """The position ids the full (unsteered) trace of `inputs` uses, when the model is not left to
    infer them from cache_position: mrope ids from the model's get_rope_index (Qwen-VL families)
    when the batch has media; nnsight's mask-derived ids for a left-padded text-only batch."""
    import inspect

    from nnsight.modeling.processing import positions

    ids, mask = inputs["input_ids"], inputs.get("attention_mask")
    base = getattr(getattr(mm, "hf", None), "model", None)
    gri = getattr(base, "get_rope_index", None)
    has_media = any(k.startswith("pixel_values") for k in inputs)
    if gri is not None and has_media:
        names = inspect.signature(gri).parameters
        pos, _ = gri(ids, **{k: v for k, v in inputs.items() if k in names and k != "input_ids"})
        return pos
    if not has_media and mask is not None and not bool(mask.all()):
        return positions(mask)
    return None


def first_token_sweep(mm: Any, batch: Any, steerers: Sequence[Steerer], *, reuse_prefix: bool | None = None,
                      check: bool = True, atol: float = 1e-4) -> tuple[torch.Tensor, list[dict]]:
    """Next-token logits at the last prompt column for each steerer: ([S, batch, vocab] float32, records).

    A first-token steerer edits only the last prompt column, so every earlier column is the same
    as in the unsteered forward. With reuse_prefix, the prompt minus its last token is run once
    (unsteered, through nnsight, keeping the key/value cache), and each steerer costs one
    single-token forward over that cache with its edit applied: the whole sweep costs about one
    prefill plus one decoding step per steerer. Steerers that edit other positions (directional
    ablation) get a full forward. With check, the cached path is verified once per call against
    a full unsteered forward (max |logit difference| <= atol); if it disagrees (a family whose
    positions are computed differently), the sweep falls back to full forwards with a warning.
    reuse_prefix=None (default): reuse it when the traces run locally, not when they run remotely
    (`mars_core.remote`), where the key/value cache would travel down and up again with every
    steerer; remotely each steerer is one full-forward request that returns only its logits.
    """
    import copy

    import nnsight

    from .remote import resolve

    if reuse_prefix is None:
        reuse_prefix = not resolve(mm)
    steerers = list(steerers)
    out: list[torch.Tensor | None] = [None] * len(steerers)
    recs: list[dict] = [{} for _ in steerers]
    cached = [i for i, st in enumerate(steerers) if reuse_prefix and st.edits_last_position_only and st.scope == "first"]
    inputs = batch.inputs
    T = batch.seq_len
    if cached and T < 2:
        cached = []
    if cached:
        ids = inputs["input_ids"]
        seq_keys = [k for k, v in inputs.items() if isinstance(v, torch.Tensor) and v.dim() == 2 and v.shape == ids.shape]
        pos = _prefix_positions(mm, inputs)
        pre = {k: (v[:, :-1] if k in seq_keys else v) for k, v in inputs.items()}
        last = {k: v[:, -1:] for k, v in inputs.items() if k in seq_keys and k != "attention_mask"}
        last.update({k: v for k, v in inputs.items() if k not in seq_keys and not k.startswith("pixel_values")})
        if "attention_mask" in inputs:
            last["attention_mask"] = inputs["attention_mask"]
        last["cache_position"] = torch.tensor([T - 1], device=ids.device)
        if pos is not None:
            pre["position_ids"] = pos[..., :-1]
            last["position_ids"] = pos[..., -1:]
        with torch.no_grad():
            with mm.nn.trace(pre, use_cache=True):
                cache = nnsight.save(mm.nn.output.past_key_values)

        def run_last(st):
            step_inputs = dict(last, past_key_values=copy.deepcopy(cache), use_cache=True)
            with torch.no_grad():
                with mm.nn.trace(step_inputs):
                    rec = nnsight.save({})
                    st.apply(mm, batch, steps=1, record=rec)
                    lg = nnsight.save(mm.logits_envoy.output[:, -1])
            return lg.detach().float().cpu(), _to_cpu(rec)

        if check:
            ref, _ = NoSteer().last_logits(mm, batch)
            got, _ = run_last(NoSteer())
            err = float((ref - got).abs().max())
            if not err <= atol:
                warnings.warn(
                    f"first_token_sweep: the cached-prefix forward differs from a full forward by {err:.3g} "
                    f"on {getattr(mm, 'model_id', 'this model')}; using full forwards",
                    stacklevel=2,
                )
                cached = []
        for i in cached:
            out[i], recs[i] = run_last(steerers[i])
    for i, st in enumerate(steerers):
        if out[i] is None:
            out[i], recs[i] = st.last_logits(mm, batch)
    return torch.stack(out), recs
