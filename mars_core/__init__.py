"""mars: Modality-Agnostic Refusal Steering of multimodal LLMs, built on nnsight.

Entry points: `load_model` (any supported transformers model under nnsight),
`collect_activations` (streaming residual-stream capture), the family registry
(`Family`, `register_family`, `families`).
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
from .model import MarsModel, PromptBatch, load_model
from .capture import collect_activations

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
]
