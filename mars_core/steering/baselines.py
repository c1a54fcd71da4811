"""The steerers MARS is compared with: no steering, ActAdd, directional ablation; and the two
nnsight edits they (and direction selection) are built from: `ablate_direction`, `add_vector`.

All edits are nnsight assignments inside the caller's trace; tensors are `[batch, pos, d_model]`
layer outputs, directions `[d_model]`.
"""

from __future__ import annotations

from typing import Any, Literal

import torch

from ..errors import InputError
from .base import Steerer, check_steps, edit_last, layers_of
from .operator import project_out, unit_direction


# ---------------------------------------------------------------------- nnsight edits
def ablate_direction(layers: Any, r: torch.Tensor, include_embeddings: bool = True) -> dict[str, Any]:
    """Call INSIDE an nnsight trace: remove the component along r ([d_model], any norm) from the
    input of layer 0 (if include_embeddings) and from the output of every decoder layer, at all
    positions. `layers` is the decoder-layer Envoy list (`mm.layers`). Touches layers in forward
    order, so other edits must come after it or be folded in.

    Returns {"input": the edited layer-0 input or None, "outputs": [edited output of each layer]}
    (live values inside the trace; wrap in `nnsight.save` to keep them after the block).
    """
    if float(r.norm()) == 0:
        raise InputError("cannot ablate a zero direction; extract directions again")
    x_in = None
    if include_embeddings:
        layers[0].input = project_out(layers[0].input, r)
        x_in = layers[0].input
    outs = []
    for layer in range(len(layers)):
        layers[layer].output[:] = project_out(layers[layer].output, r)
        outs.append(layers[layer].output)
    return {"input": x_in, "outputs": outs}


def add_vector(layers: Any, v: torch.Tensor, layer: int, positions: Literal["all", "last"] = "all",
               coeff: float = 1.0) -> None:
    """Call INSIDE an nnsight trace: add coeff * v (v [d_model]) to the output of decoder layer
    `layer`, at every position ("all") or at the last prompt column only ("last")."""
    out = layers[layer].output
    wd = torch.promote_types(out.dtype, torch.float32)
    vv = (float(coeff) * v.detach().to(torch.float64)).to(device=out.device, dtype=wd)
    if positions == "all":
        layers[layer].output[:] = (out.to(wd) + vv).to(out.dtype)
    elif positions == "last":
        layers[layer].output[:, -1] = (out[:, -1].to(wd) + vv).to(out.dtype)
    else:
        raise InputError(f"positions must be 'all' or 'last', got {positions!r}")


# ---------------------------------------------------------------------- steerers
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
        check_steps(scope, 1)
        self.r = unit_direction(direction)
        self.layer = int(layer)
        self.alpha = float(alpha)
        self.scope = scope
        self.layers_path = layers_path

    @classmethod
    def from_directions(cls, directions: Any, layer: int, coeff: float = 1.0, *, pos: int = -1,
                        scope: str = "first", layers_path: str | None = None) -> "ActAdd":
        v = directions.direction(layer, pos, unit=False)
        return cls(v, layer % directions.n_layers, coeff * float(v.norm()), scope=scope, layers_path=layers_path)

    def layers_used(self):
        return (self.layer,)

    def vector_size(self):
        return int(self.r.numel())

    def _fingerprint_parts(self):
        return {**Steerer._fingerprint_parts(self), "r": self.r, "layer": self.layer, "alpha": self.alpha}

    def step(self, mm, batch=None, *, record=None):
        def fn(x):
            a = torch.full((x.shape[0],), self.alpha, dtype=torch.float64, device=x.device)
            return a[:, None] * self.r.to(x.device)[None, :], {"alpha": a}

        edit_last(layers_of(mm, self.layers_path), self.layer, fn, record)

    def __repr__(self):
        return f"ActAdd(layer={self.layer}, alpha={self.alpha:.4g}, scope={self.scope!r})"


class DirectionalAblation(Steerer):
    """Directional ablation (Arditi et al. 2024): x' = x - (x . r) r on the input of layer 0 and
    the output of every decoder layer, at every position, at every forward pass (scope "every":
    pass steps=max_new_tokens inside generate). This removes refusal; it is the bypass baseline.
    The edit is `ablate_direction` (the same one direction selection scores)."""

    name = "ablation"
    edits_last_position_only = False

    def __init__(self, direction: torch.Tensor, *, include_embeddings: bool = True, scope: str = "every",
                 layers_path: str | None = None):
        check_steps(scope, 1)
        self.r = unit_direction(direction)
        self.include_embeddings = bool(include_embeddings)
        self.scope = scope
        self.layers_path = layers_path

    def vector_size(self):
        return int(self.r.numel())

    def _fingerprint_parts(self):
        return {**Steerer._fingerprint_parts(self), "r": self.r, "embeddings": self.include_embeddings}

    def step(self, mm, batch=None, *, record=None):
        ablate_direction(layers_of(mm, self.layers_path), self.r, include_embeddings=self.include_embeddings)

    def __repr__(self):
        return f"DirectionalAblation(scope={self.scope!r}, include_embeddings={self.include_embeddings})"
