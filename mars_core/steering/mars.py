"""MARS, the modality-agnostic refusal-steering operator, and its saved form (one file set).

    mars = fit_mars(mm, calib, harmful_texts, safe_sets)     # layer and gate from text and safe data
    mars.save("runs/llava/mars")                             # mars.json + calibration.safetensors (+ fit .nc)
    mars = MARS.load("runs/llava/mars", model=mm)            # the same operator, bit for bit

`MARS(calibration, layer, ...)` builds the operator with the given settings; its defaults (tau
0.5, gain 2, margin 0.5) are not fitted to any model: documented paths fit them
(`mars_core.steering.fit_mars`) or load a fitted operator (`MARS.load`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from ..errors import ArtifactError, IncompatibleModelError, InputError
from ..provenance import atomic_write_json, make_provenance
from .base import Steerer, check_steps, edit_last, layers_of, modality_of, model_depth_width
from .calibration import MarsCalibration
from .operator import OFFSET_MODES, UNITS, mars_strength

ARTIFACT_FORMAT = "mars-operator"
ARTIFACT_VERSION = "1"
OPERATOR_KWARGS = ("recenter", "adaptive", "trust_region", "offset_mode", "scope", "gain", "gain_units", "tau",
                   "margin", "alpha")
"""The operator's settings (everything but the calibration and the layer)."""


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

    `.selection` / `.gate_selection` (xarray Datasets) and `.fit_info` (dict) say how a fitted
    operator's layer and gate were chosen (None / {} when built by hand).
    """

    name = "mars"
    CLIENT_ONLY = ("selection", "gate_selection")

    def __init__(self, calibration: MarsCalibration, layer: int, *, recenter: bool = True, adaptive: bool = True,
                 trust_region: bool = True, offset_mode: str = "judge", scope: str = "first", gain: float = 2.0,
                 gain_units: str = "gap", tau: float = 0.5, margin: float = 0.5, alpha: float = 1.0,
                 layers_path: str | None = None):
        check_steps(scope, 1)
        if offset_mode not in OFFSET_MODES:
            raise InputError(f"offset_mode={offset_mode!r}; use one of {OFFSET_MODES}")
        if gain_units not in UNITS:
            raise InputError(f"gain_units={gain_units!r}; use one of {UNITS}")
        if margin < 0 or gain < 0:
            raise InputError("gain and margin must be >= 0")
        at = calibration.at(layer)
        self.calibration = calibration
        self.layer = calibration.layers[calibration.index(layer)]
        self.r = at["r"]
        self.p_harm, self.p_safe = at["p_harm"], at["p_safe"]
        self.offsets = at["offsets"]
        self.recenter, self.adaptive, self.trust_region = bool(recenter), bool(adaptive), bool(trust_region)
        self.offset_mode, self.scope = offset_mode, scope
        self.gain, self.gain_units, self.tau = float(gain), gain_units, float(tau)
        self.margin, self.alpha = float(margin), float(alpha)
        self.layers_path = layers_path or calibration.layers_path
        self.selection = None  # xarray Dataset: how the layer was chosen (fit_mars)
        self.gate_selection = None  # xarray Dataset: how the gate was chosen (fit_mars)
        self.fit_info: dict[str, Any] = {}

    # -- settings -----------------------------------------------------------------------------
    @property
    def config(self) -> dict[str, Any]:
        """The layer and every operator setting (`MARS(calibration, **config)` rebuilds it)."""
        return dict(layer=self.layer, recenter=self.recenter, adaptive=self.adaptive, trust_region=self.trust_region,
                    offset_mode=self.offset_mode, scope=self.scope, gain=self.gain, gain_units=self.gain_units,
                    tau=self.tau, margin=self.margin, alpha=self.alpha)

    @property
    def gate(self) -> dict[str, float]:
        """{"tau", "gain", "margin"}: the gate a fit chooses."""
        return {"tau": self.tau, "gain": self.gain, "margin": self.margin}

    def variant(self, **changes: Any) -> "MARS":
        """A new MARS on the same calibration with some settings (or the layer) changed."""
        cfg = {**self.config, **changes}
        return MARS(self.calibration, cfg.pop("layer"), layers_path=self.layers_path, **cfg)

    def layers_used(self):
        return (self.layer,)

    def vector_size(self):
        return int(self.r.numel())

    def check(self, mm):
        n_layers, d_model = model_depth_width(mm, self.layers_path)
        c = self.calibration
        if n_layers != c.n_layers or (d_model is not None and d_model != c.d_model):
            raise IncompatibleModelError(
                f"this MARS was calibrated for a model with {c.n_layers} layers and d_model={c.d_model}; the model "
                f"has {n_layers} and d_model={d_model}. Calibrate and fit MARS for this model")
        Steerer.check(self, mm)

    def _fingerprint_parts(self):
        return {**Steerer._fingerprint_parts(self), "config": self.config, "r": self.r, "p": (self.p_harm, self.p_safe),
                "offsets": self.offsets}

    # -- the edit -----------------------------------------------------------------------------
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
        modality = modality_of(batch)

        def fn(x):
            res = self.strength(x, modality)
            return res["delta"], {k: res[k] for k in ("alpha", "score", "proj", "proj_c", "cap")}

        edit_last(layers_of(mm, self.layers_path), self.layer, fn, record)

    # -- fitting and persistence -----------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """Write the operator as one folder: `mars.json` (settings, layer, how it was fitted,
        provenance), `calibration.safetensors` (bit-exact tensors) and, for a fitted operator,
        `layer_selection.nc` / `gate_selection.nc`. Every file is written atomically."""
        from ..datasets import save_dataset

        path = Path(path)
        if path.exists() and not path.is_dir():
            raise InputError(f"{path} is a file; MARS.save writes a folder (e.g. runs/model/mars)")
        path.mkdir(parents=True, exist_ok=True)
        self.calibration.save(path / "calibration.safetensors")
        files = {}
        for name, ds in (("layer_selection", self.selection), ("gate_selection", self.gate_selection)):
            if ds is not None:
                save_dataset(ds, path / f"{name}.nc")
                files[name] = f"{name}.nc"
        meta = {
            "format": ARTIFACT_FORMAT, "format_version": ARTIFACT_VERSION, "config": self.config,
            "layers_path": self.layers_path, "fit_info": self.fit_info, "files": files,
            "fingerprint": self.fingerprint, "calibration_fingerprint": self.calibration.fingerprint,
            "provenance": make_provenance(model_id=self.calibration.provenance.get("model_id", ""),
                                          n_layers=self.calibration.n_layers, d_model=self.calibration.d_model,
                                          layer=self.layer, fitted=bool(self.fit_info)),
        }
        atomic_write_json(path / "mars.json", meta)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, model: Any = None) -> "MARS":
        """The operator a `save` wrote (same steering, bit for bit); IncompatibleModelError if
        `model` has another shape; ArtifactError naming the problem if a file is missing or corrupt."""
        from ..datasets import load_dataset

        path = Path(path)
        meta_path = path / "mars.json"
        if not meta_path.is_file():
            raise ArtifactError(f"no fitted MARS at {path} (no mars.json); give the folder MARS.save or "
                                "`mars reproduce` wrote (e.g. OUT/data/mars)")
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except ValueError as e:
            raise ArtifactError(f"{meta_path} is not valid JSON ({e}); save the operator again") from e
        if meta.get("format") != ARTIFACT_FORMAT:
            raise ArtifactError(f"{meta_path} is not a MARS operator file (format={meta.get('format')!r})")
        if meta.get("format_version") != ARTIFACT_VERSION:
            raise ArtifactError(f"{meta_path} has format version {meta.get('format_version')!r}; this mars reads "
                                f"{ARTIFACT_VERSION!r}")
        calib = MarsCalibration.load(path / "calibration.safetensors", model=model)
        cfg = dict(meta["config"])
        op = cls(calib, cfg.pop("layer"), layers_path=meta.get("layers_path"), **cfg)
        op.fit_info = dict(meta.get("fit_info") or {})
        files = meta.get("files") or {}
        if "layer_selection" in files:
            op.selection = load_dataset(path / files["layer_selection"])
        if "gate_selection" in files:
            op.gate_selection = load_dataset(path / files["gate_selection"])
        if meta.get("fingerprint") and op.fingerprint != meta["fingerprint"]:
            raise ArtifactError(f"{path}: the loaded operator does not match the saved fingerprint; the files "
                                "were changed after saving. Fit and save it again")
        return op

    def __repr__(self):
        return "MARS(" + ", ".join(f"{k}={v!r}" for k, v in self.config.items()) + ")"
