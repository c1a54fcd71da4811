"""Small synthetic Datasets that follow docs/datasets.md exactly.

They exist for the figure and I/O tests and as executable documentation of the schema: each
builder shows the dims, coordinates, variables, units and provenance attributes that the real
analysis returns. The numbers are made up (seeded) but shaped like the paper's findings.
"""

from __future__ import annotations

import numpy as np
import xarray as xr

from mars_core.provenance import make_provenance

STRENGTH_UNITS = "x text mean-difference norm"
COORD_ATTRS = {
    "layer": {"long_name": "decoder layer", "units": "index"},
    "strength": {"long_name": "steering strength", "units": STRENGTH_UNITS},
    "modality": {"long_name": "input modality"},
    "prompt_set": {"long_name": "prompt set"},
    "method": {"long_name": "steering method"},
    "prompt": {"long_name": "prompt index"},
    "recenter": {"long_name": "modality offset re-centering"},
    "checkpoint": {"long_name": "direction source checkpoint"},
    "checkpoint_b": {"long_name": "steered checkpoint"},
    "k": {"long_name": "subspace dimension"},
    "metric": {"long_name": "evaluation metric"},
    "bound": {"long_name": "estimate or 95% bootstrap CI bound"},
}


def provenance(analysis: str, seed: int = 0) -> dict:
    """Provenance attributes as the analyses write them (fixed `created` for determinism)."""
    return make_provenance(
        analysis=analysis, model_id="synthetic", model_config_hash="0" * 16, seed=seed,
        harmful_prompts_sha256="1" * 16, harmless_prompts_sha256="2" * 16,
        created="2026-01-01T00:00:00+00:00",
    )


def _attach(ds: xr.Dataset) -> xr.Dataset:
    for name, attrs in COORD_ATTRS.items():
        if name in ds.coords:
            ds[name].attrs.update(attrs)
    return ds


def _var(dims, data, long_name, units):
    return (dims, np.asarray(data, dtype=float), {"long_name": long_name, "units": units})


def alignment(n_layers: int = 12, modalities=("image", "video"), seed: int = 0) -> xr.Dataset:
    """`analysis.alignment.layer_alignment`: per-layer geometry of the modality gap."""
    rng = np.random.default_rng(seed)
    x = np.linspace(0, 1, n_layers)[:, None]
    m = np.arange(len(modalities))[None, :]
    noise = lambda s: rng.normal(0, s, (n_layers, len(modalities)))  # noqa: E731
    cos_dir = 0.25 + 0.65 * np.sin(np.pi * x) ** 0.7 - 0.12 * m + noise(0.02)
    cos_off = 0.35 * np.exp(-3 * x) + 0.1 + 0.05 * m + noise(0.02)
    ratio = 4.0 - 2.5 * x + 0.4 * m + noise(0.05)
    proj = 0.9 * np.exp(-2 * x) + 0.2 + noise(0.03)
    auc = np.clip(0.55 + 0.43 * np.sin(np.pi * x) ** 0.5 - 0.04 * m + noise(0.01), 0, 1)
    d = ("layer", "modality")
    ds = xr.Dataset(
        {
            "cos_direction": _var(d, cos_dir, "cosine(text direction, modality direction)", "cosine"),
            "cos_offset": _var(d, cos_off, "cosine(modality offset, text direction)", "cosine"),
            "offset_norm_ratio": _var(d, ratio, "||offset|| / ||text mean difference||", "ratio"),
            "offset_projection_ratio": _var(
                d, proj, "offset projection / text harmful-harmless gap", "ratio"),
            "auc": _var(d, auc, "harmful-vs-harmless AUC along text direction", "AUC"),
        },
        coords={"layer": np.arange(n_layers), "modality": list(modalities)},
        attrs=provenance("alignment", seed),
    )
    return _attach(ds)


METHODS_CURVES = ("none", "actadd", "mars_no_recenter", "mars")
IGNORE_STRENGTH = ("none", "ablation", "mars", "mars_no_recenter", "mars_given_layer",
                   "mars_all_tokens")


def curves(n_layers: int = 8, n_prompts: int = 16, methods=METHODS_CURVES,
           strengths=(0.0, 0.5, 1.0, 1.5, 2.0, 3.0), seed: int = 0) -> xr.Dataset:
    """`analysis.curves.refusal_curves`: per-prompt refusal scores and judgements."""
    rng = np.random.default_rng(seed)
    mods, sets = ["text", "image", "video"], ["harmful", "harmless"]
    layer = np.arange(n_layers)
    s = np.asarray(strengths, dtype=float)
    shape = (len(methods), 3, 2, n_layers, len(s), n_prompts)
    base = np.array([[2.0, -4.0], [-1.0, -4.0], [-1.5, -4.0]])  # modality x prompt_set
    eff = np.sin(np.pi * (layer + 0.5) / n_layers)  # steering works best mid-network
    # common random numbers: a prompt's noise is shared by methods (ActAdd at 0 == none)
    noise = rng.normal(0, 1.0, shape[1:])
    uniform = rng.random(shape[1:])
    score = np.empty(shape)
    for i, m in enumerate(methods):
        for j in range(3):
            for k in range(2):
                b = base[j, k]
                if m == "actadd":
                    v = b + 2.5 * eff[:, None] * s[None, :]
                elif m == "mars_no_recenter":
                    gap = 1.5 if j else 0.0  # the modality offset adds spurious refusal
                    v = b + (4.5 if k == 0 else gap) * eff[:, None] + 0 * s[None, :]
                elif m == "mars":
                    v = b + (4.5 if k == 0 else 0.3) * eff[:, None] + 0 * s[None, :]
                else:
                    v = np.full((n_layers, len(s)), b)
                score[i, j, k] = v[..., None] + noise[j, k]
    refused = (uniform < 1 / (1 + np.exp(-score))).astype(float)
    for i, m in enumerate(methods):
        if m in IGNORE_STRENGTH:  # constant along strength, as the schema says
            score[i] = score[i, :, :, :, :1]
            refused[i] = refused[i, :, :, :, :1]
    refused[..., -1] = np.nan  # one prompt not generated: NaN, as the schema allows
    dims = ("method", "modality", "prompt_set", "layer", "strength", "prompt")
    ds = xr.Dataset(
        {
            "score": _var(dims, score, "first-token refusal score", "log-odds"),
            "refused": _var(dims, refused, "judged refusal", "1"),
        },
        coords={"method": list(methods), "modality": mods, "prompt_set": sets, "layer": layer,
                "strength": s, "prompt": np.arange(n_prompts)},
        attrs=provenance("curves", seed),
    )
    return _attach(ds)


def spurious(n_prompts: int = 40, strengths=(0.0, 0.5, 1.0, 1.5, 2.0, 3.0),
             modalities=("image", "video"), seed: int = 0) -> xr.Dataset:
    """`analysis.spurious.spurious_refusal`: safe multimodal inputs with/without re-centering."""
    rng = np.random.default_rng(seed)
    s = np.asarray(strengths, dtype=float)
    nm = len(modalities)
    shift = np.array([0.65, 0.0])[:, None, None]  # no re-centering: offset pushes toward harm
    proj = shift + 0.05 * np.arange(nm)[None, :, None] + rng.normal(0, 0.2, (2, nm, n_prompts))
    score = -4 + 3.0 * proj[:, None] * s[None, :, None, None] + rng.normal(
        0, 0.8, (2, len(s), nm, n_prompts))
    refused = (rng.random(score.shape) < 1 / (1 + np.exp(-score))).astype(float)
    gate = (proj > 0.5).astype(float)
    d4 = ("recenter", "strength", "modality", "prompt")
    d3 = ("recenter", "modality", "prompt")
    ds = xr.Dataset(
        {
            "refused": _var(d4, refused, "judged refusal of safe inputs", "1"),
            "score": _var(d4, score, "first-token refusal score", "log-odds"),
            "projection": _var(d3, proj, "normalised projection s on refusal direction",
                               "0 = harmless text centroid, 1 = harmful text centroid"),
            "gate_open": _var(d3, gate, "adaptive gate opened", "1"),
        },
        coords={"recenter": [False, True], "strength": s, "modality": list(modalities),
                "prompt": np.arange(n_prompts)},
        attrs={**provenance("spurious", seed), "p_harm": 3.2, "p_safe": -1.1, "layer": 5},
    )
    _attach(ds)
    ds["strength"].attrs.update(long_name="MARS gain", units="× text gap per unit of s above τ")  # as the analysis
    return ds


CHECKPOINTS = ("base", "instruct", "mm-sft", "mm-rlhf")


def stability(checkpoints=CHECKPOINTS, n_layers: int = 8, n_k: int = 4,
              seed: int = 0) -> xr.Dataset:
    """`analysis.stability.direction_stability`: refusal directions across checkpoints."""
    rng = np.random.default_rng(seed)
    c = len(checkpoints)
    dist = np.abs(np.subtract.outer(np.arange(c), np.arange(c)))
    lay = np.sin(np.pi * (np.arange(n_layers) + 0.5) / n_layers)
    cos = 1 - 0.12 * dist[..., None] * (1.3 - 0.5 * lay) + rng.normal(0, 0.01, (c, c, n_layers))
    cos = np.clip((cos + cos.transpose(1, 0, 2)) / 2, -1, 1)
    cos[np.arange(c), np.arange(c)] = 1.0
    k = np.arange(1, n_k + 1)
    ang = 8 * dist[..., None] * (1 + 0.6 * k) + rng.normal(0, 0.5, (c, c, n_k))
    ang = np.abs((ang + ang.transpose(1, 0, 2)) / 2)
    ang[np.arange(c), np.arange(c)] = 0.0
    transplant = np.clip(0.92 - 0.1 * dist + rng.normal(0, 0.02, (c, c)), 0, 1)
    ds = xr.Dataset(
        {
            "cosine": _var(("checkpoint", "checkpoint_b", "layer"), cos,
                           "cosine of refusal directions", "cosine"),
            "principal_angle": _var(("checkpoint", "checkpoint_b", "k"), ang,
                                    "principal angle of top-k subspaces", "degrees"),
            "transplant_refusal": _var(("checkpoint", "checkpoint_b"), transplant,
                                       "refusal rate on harmful image requests", "1"),
        },
        coords={"checkpoint": list(checkpoints), "checkpoint_b": list(checkpoints),
                "layer": np.arange(n_layers), "k": k},
        attrs=provenance("stability", seed),
    )
    return _attach(ds)


METRICS = ("harmful_text", "harmful_image", "harmful_video", "harmless_text",
           "harmless_image", "harmless_video", "caption_accuracy")
METHODS_COMPARISON = ("none", "actadd", "ablation", "autosteer", "mars_no_recenter", "mars")


def comparison(methods=METHODS_COMPARISON, seed: int = 0) -> xr.Dataset:
    """`analysis.comparison.method_comparison`: one row per method, with bootstrap CIs."""
    rng = np.random.default_rng(seed)
    est = {
        "none": [0.92, 0.35, 0.28, 0.03, 0.04, 0.05, 0.71],
        "actadd": [0.99, 0.81, 0.74, 0.22, 0.41, 0.45, 0.55],
        "ablation": [0.10, 0.05, 0.04, 0.01, 0.01, 0.02, 0.70],
        "autosteer": [0.95, 0.78, 0.70, 0.08, 0.15, 0.17, 0.66],
        "mars_no_recenter": [0.97, 0.90, 0.86, 0.05, 0.38, 0.42, 0.63],
        "mars": [0.97, 0.91, 0.87, 0.04, 0.06, 0.07, 0.69],
    }
    value = np.empty((len(methods), len(METRICS), 3))
    for i, m in enumerate(methods):
        e = np.asarray(est.get(m, rng.uniform(0, 1, len(METRICS))))
        w = rng.uniform(0.03, 0.08, len(METRICS))
        value[i] = np.stack([e, np.clip(e - w, 0, 1), np.clip(e + w, 0, 1)], axis=-1)
    if "ablation" in methods:  # a cell that was not measured is NaN
        value[list(methods).index("ablation"), METRICS.index("harmless_video")] = np.nan
    ds = xr.Dataset(
        {"value": _var(("method", "metric", "bound"), value, "refusal rate or utility",
                       "fraction")},
        coords={"method": list(methods), "metric": list(METRICS),
                "bound": ["estimate", "low", "high"]},
        attrs=provenance("comparison", seed),
    )
    return _attach(ds)


def all_datasets() -> dict[str, xr.Dataset]:
    """Every synthetic Dataset, keyed by its `attrs["analysis"]`."""
    return {ds.attrs["analysis"]: ds for ds in
            (alignment(), curves(), spurious(), stability(), comparison())}
