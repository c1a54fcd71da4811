"""mars: Modality-Agnostic Refusal Steering of multimodal LLMs, built on nnsight.

Entry points: `load_model` (any supported transformers model under nnsight),
`collect_activations` (streaming residual-stream capture), `RefusalDirections` (text
difference-of-means directions), scoring and judges, `select_direction`, and the family
registry (`Family`, `register_family`, `families`); steering: `MARS` (`save`,
`load`), `ActAdd`, `DirectionalAblation`, `AutoSteer`, `MarsCalibration`, `neutral_calibration`,
`fit_mars`, `select_mars_layer`, `select_mars_gate`.

The core never imports the study pipeline (`analysis`: analyses, figures, `mars` CLI).
"""

from ._version import __version__
from .errors import (
    ArtifactError,
    IncompatibleModelError,
    InputError,
    MarsError,
    UnsupportedArchitectureError,
)
from .families import Family, families, family_for_config, get_family, register_family, unregister_family
from .model import MarsModel, PromptBatch
from .loading import load_model
from .capture import collect_activations
from .prompts import PromptSet
from .directions import RefusalDirections
from .scoring import (
    Judge,
    SubstringJudge,
    first_token_refusal_score,
    refusal_scores,
    refusal_token_ids,
)
from .selection import select_direction
from .steering import (
    MARS,
    ActAdd,
    DirectionalAblation,
    MarsCalibration,
    NoSteer,
    Steerer,
    calibrate_mars,
    fit_mars,
    neutral_calibration,
    select_mars_gate,
    select_mars_layer,
)
from .autosteer import AutoSteer

__all__ = [
    "__version__",
    "ArtifactError",
    "IncompatibleModelError",
    "InputError",
    "MarsError",
    "UnsupportedArchitectureError",
    "Family",
    "families",
    "family_for_config",
    "get_family",
    "register_family",
    "unregister_family",
    "MarsModel",
    "PromptBatch",
    "load_model",
    "collect_activations",
    "PromptSet",
    "RefusalDirections",
    "Judge",
    "SubstringJudge",
    "first_token_refusal_score",
    "refusal_scores",
    "refusal_token_ids",
    "select_direction",
    "MARS",
    "ActAdd",
    "DirectionalAblation",
    "MarsCalibration",
    "NoSteer",
    "Steerer",
    "calibrate_mars",
    "fit_mars",
    "neutral_calibration",
    "select_mars_gate",
    "select_mars_layer",
    "AutoSteer",
]
