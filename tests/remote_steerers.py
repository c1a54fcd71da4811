"""Steerers with fixed random directions, shared by the fake- and real-NDIF tests
(tests/test_remote.py, tests/test_ndif.py): each edit is large enough to change the logits."""

from __future__ import annotations

import torch

from mars_core.autosteer import AutoSteer, Prober
from mars_core.steering import MARS, ActAdd, DirectionalAblation, MarsCalibration, NoSteer


def random_calibration(mm, seed: int = 0) -> MarsCalibration:
    """A MarsCalibration for `mm` with seeded unit directions [L, D] and image offsets."""
    g = torch.Generator().manual_seed(seed)
    L, D = mm.n_layers, mm.d_model
    r = torch.nn.functional.normalize(torch.randn(L, D, generator=g, dtype=torch.float64), dim=-1)
    return MarsCalibration(tuple(range(L)), r, torch.full((L,), 1.0), torch.zeros(L),
                           {"image": 0.1 * torch.randn(L, D, generator=g, dtype=torch.float64)}, L, D,
                           layers_path=mm.family.layers_path)


def example_steerers(mm, cal: MarsCalibration) -> dict:
    """{name: steerer} of every method, built from `cal` (AutoSteer's prober always fires)."""
    d = mm.d_model
    fires = Prober(torch.zeros(d), torch.ones(d), torch.zeros(64, d), torch.zeros(64), torch.zeros(2, 64),
                   torch.tensor([0.0, 20.0]))
    return {
        "mars": MARS(cal, 1, tau=-5.0),
        "mars_subtract": MARS(cal, 2, tau=-5.0, offset_mode="subtract"),
        "mars_every_token": MARS(cal, 2, tau=-5.0, scope="every"),
        "actadd": ActAdd(cal.direction[1], 1, 1.3),
        "ablation": DirectionalAblation(cal.direction[2]),
        "autosteer": AutoSteer(fires, 1, cal.direction[2], 1.1, head_layer=2),
        "none": NoSteer(),
    }
