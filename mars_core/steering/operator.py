"""The steering math, pure torch: MARS's strength, projection removal, float64 addition.

Conventions: activations `x` are `[batch, d_model]` (the last prompt position of one layer) or
`[..., d_model]` for `project_out`; directions are `[d_model]`. Everything is computed in
float64 on `x`'s device and returned (where it is a new activation) in `x`'s dtype. The exact
MARS equations are in docs/method.md, section 2; `mars_strength` is their one implementation.
"""

from __future__ import annotations

import math

import torch

from ..errors import InputError

SCOPES = ("first", "every")
OFFSET_MODES = ("judge", "subtract")
UNITS = ("gap", "abs")
MODALITIES = ("text", "image", "video")


def unit_direction(r) -> torch.Tensor:
    """`r` flattened to a float64 unit vector `[d_model]`; InputError when it is zero or not finite."""
    r = (r.detach() if isinstance(r, torch.Tensor) else torch.as_tensor(r, dtype=torch.float64)).to(torch.float64)
    r = r.flatten()
    n = r.norm()
    if not torch.isfinite(n) or float(n) == 0.0:
        raise InputError("the steering direction is zero or not finite; extract directions again")
    return r / n


def add_f64(x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """x + delta, summed in float64, returned in x's dtype (delta broadcasts against x)."""
    return (x.to(torch.float64) + delta.to(device=x.device, dtype=torch.float64)).to(x.dtype)


def project_out(x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """x - (x . r̂) r̂ for x `[..., d_model]`, r `[d_model]` (normalised here); computed in at least
    float32 and returned in x's dtype."""
    wd = torch.promote_types(x.dtype, torch.float32)
    rr = r.detach().to(torch.float64)
    rr = (rr / rr.norm()).to(device=x.device, dtype=wd)
    xf = x.to(wd)
    return (xf - (xf @ rr).unsqueeze(-1) * rr).to(x.dtype)


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
    """The MARS equations for a batch of activations (docs/method.md, section 2).

    x: [batch, d_model] activations at the intervention layer, last prompt position (any float
    dtype, any device). r: [d_model] unit direction. p_harm, p_safe: projections of the text
    harmful / harmless centroids on r (p_harm > p_safe). offset: [d_model] modality offset o_m
    (None or zeros for text).

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
