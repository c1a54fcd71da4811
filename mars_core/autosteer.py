"""AutoSteer baseline (Wu et al. 2025, "AutoSteer: Automating Steering for Safe Multimodal LLMs"),
with the same interface as the other steerers (`mars_core.steering.Steerer`).

Three parts (equations in docs/method.md, section 5):

1. Safety Awareness Score (SAS) per layer l, from N paired prompts (harmful_i, harmless_i),
   activations a at the last prompt position:
       d_i = a_l(harmful_i) - a_l(harmless_i),   u_i = d_i / ||d_i||
       SAS_l = 1 / (N (N - 1)) * sum_{i != j} u_i . u_j  =  (||sum_i u_i||^2 - N) / (N (N - 1))
   (the mean pairwise cosine of the per-pair differences). The probe layer is argmax SAS over
   the candidate layers (by default those below floor(n_layers * (1 - prune_layer_frac))).
2. Prober: an MLP d_model -> 64 -> 2 (ReLU) on standardised activations z = (x - mu) / sd at the
   probe layer, trained with full-batch Adam on cross-entropy (seeded init, deterministic on
   CPU); p_harm(x) = softmax(MLP(z))[1].
3. Refusal Head, realised as steering toward refusal: when p_harm(x) > threshold, add
   beta * r_h (r_h the unit text refusal direction at the head layer h >= probe layer) to the
   residual stream at layer h, last prompt position, at prefill only (first generated token):
       x_h' = x_h + beta * 1[p_harm(x) > threshold] * r_h
   beta is in residual units (beta_units="abs") or in units of ||mu_harm_h - mu_safe_h||
   ("gap", default). The paper's head is a trained module that emits a refusal; this
   realisation needs no refusal responses, only what the other methods use.

Data it needs: paired harmful / harmless text prompts (paired by index) for SAS; labelled
activations for the prober (the same text prompts: harmful = 1, harmless = 0, plus optional
labelled multimodal examples via `extra`); and text `RefusalDirections` for the head.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from .errors import InputError
from .provenance import make_provenance, sha256_text
from .steering.base import Steerer, check_steps, edit_last, layers_of
from .steering.operator import unit_direction

AUTOSTEER_FORMAT = "mars-autosteer"


# ============================================================================ SAS
def safety_awareness_score(acts_harmful: torch.Tensor, acts_harmless: torch.Tensor) -> torch.Tensor:
    """SAS per layer: mean pairwise cosine of the per-pair differences.

    acts_harmful, acts_harmless: [N, L, D] (pair i = row i of each), N >= 2. Returns [L] float64.
    Pairs whose difference is zero have no direction and raise InputError.
    """
    h = torch.as_tensor(acts_harmful).to(torch.float64)
    s = torch.as_tensor(acts_harmless).to(torch.float64)
    if h.shape != s.shape or h.dim() != 3:
        raise InputError(f"SAS needs two [N, L, D] tensors of the same shape, got {tuple(h.shape)} and {tuple(s.shape)}")
    n = h.shape[0]
    if n < 2:
        raise InputError("SAS needs at least 2 harmful/harmless pairs")
    d = h - s
    norm = d.norm(dim=-1, keepdim=True)
    if bool((norm == 0).any()):
        raise InputError("a harmful/harmless pair has identical activations; SAS is undefined for it")
    u = d / norm
    tot = u.sum(0)  # [L, D]
    return (torch.einsum("ld,ld->l", tot, tot) - n) / (n * (n - 1))


# ============================================================================ prober
@dataclass(eq=False)
class Prober:
    """MLP d_model -> hidden -> 2 on standardised inputs; all tensors float32, CPU."""

    mean: torch.Tensor  # [D]
    std: torch.Tensor  # [D]
    w1: torch.Tensor  # [H, D]
    b1: torch.Tensor  # [H]
    w2: torch.Tensor  # [2, H]
    b2: torch.Tensor  # [2]

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """[batch, 2] logits for activations x [batch, D] (any dtype/device), float32."""
        dev = x.device
        z = (x.to(torch.float32) - self.mean.to(dev)) / self.std.to(dev)
        h = torch.relu(z @ self.w1.to(dev).T + self.b1.to(dev))
        return h @ self.w2.to(dev).T + self.b2.to(dev)

    def prob(self, x: torch.Tensor) -> torch.Tensor:
        """p_harm [batch] float64."""
        return torch.softmax(self.logits(x).to(torch.float64), dim=-1)[:, 1]

    @property
    def d_model(self) -> int:
        return int(self.w1.shape[1])


def train_prober(x: torch.Tensor, y: torch.Tensor, *, hidden: int = 64, epochs: int = 300, lr: float = 1e-2,
                 weight_decay: float = 1e-4, seed: int = 0) -> Prober:
    """Train the d_model -> hidden -> 2 MLP prober with full-batch Adam on cross-entropy.

    x: [N, D] activations; y: [N] labels in {0, 1} (1 = harmful). Initialisation uses a
    torch.Generator seeded with `seed`; training runs in float32 on CPU, so the result is
    deterministic for a given input.
    """
    x = torch.as_tensor(x).detach().to(torch.float32).cpu()
    y = torch.as_tensor(y).detach().to(torch.long).cpu().flatten()
    if x.dim() != 2 or x.shape[0] != y.shape[0]:
        raise InputError(f"prober needs x [N, D] and y [N], got {tuple(x.shape)} and {tuple(y.shape)}")
    if set(y.tolist()) != {0, 1}:
        raise InputError("prober labels must contain both classes 0 (harmless) and 1 (harmful)")
    mean = x.mean(0)
    std = x.std(0, unbiased=False).clamp_min(1e-6)
    z = (x - mean) / std
    g = torch.Generator().manual_seed(int(seed))
    d = x.shape[1]
    w1 = (torch.rand(hidden, d, generator=g) * 2 - 1) / math.sqrt(d)
    b1 = (torch.rand(hidden, generator=g) * 2 - 1) / math.sqrt(d)
    w2 = (torch.rand(2, hidden, generator=g) * 2 - 1) / math.sqrt(hidden)
    b2 = (torch.rand(2, generator=g) * 2 - 1) / math.sqrt(hidden)
    params = [p.requires_grad_() for p in (w1, b1, w2, b2)]
    opt = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    # Small problems run single-threaded: intra-op threads only add synchronisation (measured:
    # 200 steps on 40 x 12 took 18 s with 2 threads on a busy 2-core machine, 0.13 s with 1).
    n_threads = torch.get_num_threads()
    if x.numel() <= 2_000_000:
        torch.set_num_threads(1)
    try:
        with torch.enable_grad():
            for _ in range(int(epochs)):
                opt.zero_grad()
                logits = torch.relu(z @ params[0].T + params[1]) @ params[2].T + params[3]
                loss = torch.nn.functional.cross_entropy(logits, y)
                loss.backward()
                opt.step()
    finally:
        torch.set_num_threads(n_threads)
    return Prober(mean, std, *(p.detach().clone() for p in params))


# ============================================================================ the steerer
class AutoSteer(Steerer):
    """SAS-chosen probe layer + MLP prober + Refusal Head (steering toward refusal when the
    prober fires). See the module docstring for the equations; build with `AutoSteer.fit`.

    Records (when asked): "p_harm" [batch] prober probability, "gate" [batch] bool, "alpha"
    [batch] strength added at the head layer (beta or 0).
    """

    name = "autosteer"
    CLIENT_ONLY = ("sas",)

    def __init__(self, prober: Prober, probe_layer: int, direction: torch.Tensor, beta: float, *,
                 head_layer: int | None = None, threshold: float = 0.5, scope: str = "first",
                 layers_path: str | None = None):
        check_steps(scope, 1)
        self.prober = prober
        self.probe_layer = int(probe_layer)
        self.head_layer = self.probe_layer if head_layer is None else int(head_layer)
        if self.head_layer < self.probe_layer:
            raise InputError(
                f"head_layer {self.head_layer} is before probe_layer {self.probe_layer}: the head can only act "
                "after the prober has read its layer (nnsight edits run in forward order)"
            )
        self.r = unit_direction(direction)
        if self.r.numel() != prober.d_model:
            raise InputError(f"direction has {self.r.numel()} dims, the prober {prober.d_model}")
        self.beta = float(beta)
        self.threshold = float(threshold)
        self.scope = scope
        self.layers_path = layers_path
        self.sas = None  # xarray Dataset when built by fit
        self.metrics: dict[str, float] = {}

    def layers_used(self):
        return (self.probe_layer, self.head_layer)

    def vector_size(self):
        return int(self.r.numel())

    def _fingerprint_parts(self):
        p = self.prober
        return {**Steerer._fingerprint_parts(self), "prober": (p.mean, p.std, p.w1, p.b1, p.w2, p.b2),
                "layers": (self.probe_layer, self.head_layer), "r": self.r, "beta": self.beta,
                "threshold": self.threshold}

    def step(self, mm, batch=None, *, record=None):
        layers = layers_of(mm, self.layers_path)
        got: dict[str, torch.Tensor] = {}

        def probe(x):
            p = self.prober.prob(x)
            gate = p > self.threshold
            got.update(alpha=gate.to(torch.float64) * self.beta, p_harm=p, gate=gate)

        def head(x):
            if not got:  # head at the probe layer: the prober reads this same activation
                probe(x)
            return got["alpha"][:, None] * self.r.to(x.device)[None, :], dict(got)

        if self.head_layer != self.probe_layer:
            probe(layers[self.probe_layer].output[:, -1])
        edit_last(layers, self.head_layer, head, record)

    # -- fitting -------------------------------------------------------------------------------
    @classmethod
    def fit(
        cls,
        mm: Any,
        harmful_texts: Sequence[str],
        harmless_texts: Sequence[str],
        directions: Any,
        *,
        layers: Sequence[int] | None = None,
        probe_layer: int | None = None,
        head_layer: int | None = None,
        beta: float = 1.0,
        beta_units: str = "gap",
        threshold: float = 0.5,
        prune_layer_frac: float = 0.2,
        extra: Sequence[dict[str, Any]] | None = None,
        seed: int = 0,
        epochs: int = 300,
        batch_size: int = 8,
    ) -> "AutoSteer":
        """Choose the probe layer by SAS, train the prober, and set the Refusal Head.

        harmful_texts[i] and harmless_texts[i] form pair i for SAS. The prober trains on the
        same prompts' activations at the probe layer (harmful = 1), plus each `extra` item
        {"texts": [...], "images"|"videos": [...], "label": 0|1}. A given probe_layer overrides
        SAS; head_layer defaults to the probe layer. Sets `.sas` (xarray Dataset: sas [layer],
        candidate [layer], attrs) and `.metrics` (training accuracy, class counts).
        """
        import xarray as xr

        from .capture import collect_activations

        harmful_texts, harmless_texts = list(harmful_texts), list(harmless_texts)
        if len(harmful_texts) != len(harmless_texts):
            raise InputError(
                f"SAS pairs prompts by index: got {len(harmful_texts)} harmful and {len(harmless_texts)} harmless"
            )
        if beta_units not in ("gap", "abs"):
            raise InputError(f"beta_units={beta_units!r}; use 'gap' or 'abs'")
        n_layers = int(mm.n_layers)
        cut = int(math.floor(n_layers * (1.0 - prune_layer_frac)))
        cand = list(range(n_layers)) if layers is None else sorted({int(l) % n_layers for l in layers})

        def acts(texts, images=None, videos=None):
            ds = collect_activations(mm, texts, images=images, videos=videos, layers=None, positions="last",
                                     reduce="none", batch_size=batch_size, progress=False)
            return torch.from_numpy(ds["acts"].sel(pos=-1).values).to(torch.float64)  # [N, L, D]

        a_h, a_s = acts(harmful_texts), acts(harmless_texts)
        sas = safety_awareness_score(a_h, a_s)  # [L]
        eligible = np.array([l in cand and l < cut for l in range(n_layers)])
        if not eligible.any():
            eligible = np.array([l in cand for l in range(n_layers)])
        if probe_layer is None:
            masked = np.where(eligible, sas.numpy(), -np.inf)
            probe_layer = int(np.argmax(masked))
        probe_layer = int(probe_layer) % n_layers
        head = probe_layer if head_layer is None else int(head_layer) % n_layers

        xs = [a_h[:, probe_layer], a_s[:, probe_layer]]
        ys = [torch.ones(len(harmful_texts)), torch.zeros(len(harmless_texts))]
        for item in extra or []:
            a = acts(item["texts"], item.get("images"), item.get("videos"))
            xs.append(a[:, probe_layer])
            ys.append(torch.full((a.shape[0],), float(item["label"])))
        x, y = torch.cat(xs), torch.cat(ys)
        prober = train_prober(x, y, seed=seed, epochs=epochs)
        acc = float(((prober.prob(x) > threshold).to(torch.float64) == y.to(torch.float64)).double().mean())

        v = directions.direction(head, -1, unit=False)
        b = beta * float(v.norm()) if beta_units == "gap" else beta
        st = cls(prober, probe_layer, v, b, head_layer=head, threshold=threshold,
                 layers_path=getattr(getattr(mm, "family", None), "layers_path", None))
        st.metrics = {"train_accuracy": acc, "n_harmful": int((y == 1).sum()), "n_harmless": int((y == 0).sum())}
        st.sas = xr.Dataset(
            {"sas": (("layer",), sas.numpy()), "eligible": (("layer",), eligible)},
            coords={"layer": list(range(n_layers))},
            attrs=make_provenance(
                probe_layer=probe_layer, head_layer=head, beta=b, beta_units=beta_units, beta_given=float(beta),
                threshold=float(threshold), seed=int(seed), epochs=int(epochs), layer_cut=cut,
                harmful_sha256=sha256_text(harmful_texts), harmless_sha256=sha256_text(harmless_texts),
                n_pairs=len(harmful_texts), train_accuracy=acc, model_id=getattr(mm, "model_id", ""),
            ),
        )
        if acc < 0.75:
            warnings.warn(f"AutoSteer prober training accuracy is only {acc:.2f}", stacklevel=2)
        return st

    # -- persistence -------------------------------------------------------------------------
    def save(self, path):
        """Write the fitted steerer as one folder: `autosteer.safetensors` (prober and head
        direction, bit-exact), `autosteer.json` (layers, strength, threshold, training metrics,
        provenance) and `sas.nc` (the SAS per layer) when fitted."""
        from pathlib import Path

        from .datasets import save_dataset
        from .provenance import atomic_write_json, save_tensor_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        p = self.prober
        save_tensor_file(path / "autosteer.safetensors",
                         {"mean": p.mean, "std": p.std, "w1": p.w1, "b1": p.b1, "w2": p.w2, "b2": p.b2, "r": self.r},
                         {}, fmt=AUTOSTEER_FORMAT, version="1", provenance=dict(self.sas.attrs) if self.sas is not None else {})
        if self.sas is not None:
            save_dataset(self.sas, path / "sas.nc")
        atomic_write_json(path / "autosteer.json", {
            "format": AUTOSTEER_FORMAT, "probe_layer": self.probe_layer, "head_layer": self.head_layer,
            "beta": self.beta, "threshold": self.threshold, "scope": self.scope, "layers_path": self.layers_path,
            "metrics": self.metrics, "fingerprint": self.fingerprint})
        return path

    @classmethod
    def load(cls, path) -> "AutoSteer":
        """The steerer `save` wrote (identical edits); ArtifactError if a file is missing or changed."""
        import json
        from pathlib import Path

        from .datasets import load_dataset
        from .errors import ArtifactError
        from .provenance import read_tensor_file

        path = Path(path)
        if not (path / "autosteer.json").is_file():
            raise ArtifactError(f"no saved AutoSteer at {path} (no autosteer.json)")
        meta = json.loads((path / "autosteer.json").read_text(encoding="utf-8"))
        t, _, _ = read_tensor_file(path / "autosteer.safetensors", fmt=AUTOSTEER_FORMAT, version="1",
                                   what="AutoSteer", required=("mean", "std", "w1", "b1", "w2", "b2", "r"))
        st = cls(Prober(t["mean"], t["std"], t["w1"], t["b1"], t["w2"], t["b2"]), meta["probe_layer"], t["r"],
                 meta["beta"], head_layer=meta["head_layer"], threshold=meta["threshold"], scope=meta["scope"],
                 layers_path=meta["layers_path"])
        st.r = t["r"]  # exactly as saved (unit_direction would renormalise it again)
        st.metrics = dict(meta.get("metrics") or {})
        if (path / "sas.nc").is_file():
            st.sas = load_dataset(path / "sas.nc")
        if st.fingerprint != meta.get("fingerprint"):
            raise ArtifactError(f"{path}: the loaded AutoSteer does not match its saved fingerprint; fit it again")
        return st

    def __repr__(self):
        return (f"AutoSteer(probe_layer={self.probe_layer}, head_layer={self.head_layer}, beta={self.beta:.4g}, "
                f"threshold={self.threshold})")
