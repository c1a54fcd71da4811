"""Steering: MARS, the baselines it is compared with, its calibration and its fitting.

Modules, one concern each:
  operator     the math (`mars_strength`, `project_out`), pure torch
  base         the `Steerer` interface, its shared read-edit-record step, steered generation
  baselines    `NoSteer`, `ActAdd`, `DirectionalAblation` (+ the nnsight edits `ablate_direction`,
               `add_vector`)
  mars         `MARS` (the operator; `save`, `load`)
  calibration  `MarsCalibration`, `neutral_calibration` (the one measuring path), `calibrate_mars`
  neutral      generated object-less inputs (`neutral_sets`, `media_side`)
  sweep        `PrefixCache` (a prompt's key/value cache reused to score first-token steerers),
               `PrefixStore` (caches of many batches keyed by their content),
               `first_token_sweep` (many steerers on one batch)
  layer        `select_mars_layer`;  gate  `select_mars_gate`;  fit  `fit_mars` (layer + gate)
`AutoSteer` lives in `mars_core.autosteer`. Everything that runs inside a trace uses only torch
and this package, so it works with `remote=True` once the package is registered for by-value
pickling (`mars_core.remote.register_remote`).
"""

from ..remote import register_remote
from .base import Generations, Steerer
from .baselines import ActAdd, DirectionalAblation, NoSteer, ablate_direction, add_vector
from .calibration import MarsCalibration, calibrate_mars, neutral_calibration
from .fit import fit_mars
from .gate import select_mars_gate, select_mars_tau
from .layer import select_mars_layer
from .mars import MARS
from .neutral import NEUTRAL_REQUESTS, media_side, neutral_images, neutral_sets, neutral_videos
from .operator import mars_strength, project_out
from .sweep import PrefixCache, PrefixStore, first_token_sweep

__all__ = [
    "ActAdd", "DirectionalAblation", "Generations", "MARS", "MarsCalibration", "NEUTRAL_REQUESTS", "NoSteer", "PrefixCache", "PrefixStore",
    "Steerer", "ablate_direction", "add_vector", "calibrate_mars", "first_token_sweep", "fit_mars",
    "mars_strength", "media_side", "neutral_calibration", "neutral_images", "neutral_sets", "neutral_videos",
    "project_out", "register_remote", "select_mars_gate", "select_mars_layer", "select_mars_tau",
]
