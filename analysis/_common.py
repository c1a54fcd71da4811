"""Shared plumbing of the analyses: input checks, batching, scoring, judging, provenance.

Every analysis builds its prompt batches once (`build_batches`: one processor encoding per
batch, which becomes one nnsight invoke), scores them with one trace per batch
(`score_batches`) and, when asked, generates and judges them with one `generate` per batch
(`judge_generations`).
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Sequence

import numpy as np
import xarray as xr

from mars_core.datasets import dataset_provenance, var
from mars_core.errors import InputError
from mars_core.prompts import PromptSet

from .synthetic import COORD_ATTRS, STRENGTH_UNITS

MODALITIES = ("text", "image", "video")
PROMPT_SETS = ("harmful", "harmless")

__all__ = [
    "COORD_ATTRS",
    "STRENGTH_UNITS",
    "MODALITIES",
    "PROMPT_SETS",
    "attach_coord_attrs",
    "var",
    "dataset_provenance",
    "check_prompt_set",
    "order_modalities",
    "build_batches",
    "score_batches",
    "judge_generations",
    "default_judge",
]


def attach_coord_attrs(ds: xr.Dataset) -> xr.Dataset:
    """Set `long_name` / `units` on the contract's coordinates present in `ds` (in place)."""
    for name, attrs in COORD_ATTRS.items():
        if name in ds.coords:
            ds[name].attrs.update(attrs)
    return ds


def check_prompt_set(ps: Any, what: str, modality: str | None = None) -> PromptSet:
    """`ps` must be a PromptSet (of `modality` if given)."""
    if not isinstance(ps, PromptSet):
        raise InputError(f"{what} must be a mars_core.prompts.PromptSet, got {type(ps).__name__}")
    if modality is not None and ps.modality != modality:
        raise InputError(
            f"{what} is keyed as {modality!r} but the prompt set {ps.name!r} is {ps.modality!r} "
            f"(it has {'images' if ps.images is not None else 'videos' if ps.videos is not None else 'no media'})"
        )
    return ps


def check_modality(m: Any, what: str) -> str:
    if m not in MODALITIES:
        raise InputError(f"{what}: modality {m!r}; use one of {MODALITIES}")
    return m


def order_modalities(mods: Iterable[str]) -> list[str]:
    """Modalities in the canonical order text, image, video (duplicates dropped)."""
    s = set(mods)
    return [m for m in MODALITIES if m in s]


def check_model_takes(mm: Any, modality: str, what: str) -> None:
    if modality == "image" and not getattr(mm, "supports_image", False):
        raise InputError(f"{what}: {getattr(mm, 'model_id', 'the model')} cannot take images")
    if modality == "video" and not getattr(mm, "supports_video", False):
        raise InputError(f"{what}: {getattr(mm, 'model_id', 'the model')} cannot take videos")


def check_layers(mm: Any, layers: Any) -> list[int]:
    """Layer indices in the given order (negative ones count from the end); InputError when
    empty, out of range or repeated."""
    if isinstance(layers, (int, np.integer)):
        layers = [int(layers)]
    out = []
    for layer in list(layers):
        li = int(layer)
        if not -mm.n_layers <= li < mm.n_layers:
            raise InputError(f"layer {layer} is out of range for a model with {mm.n_layers} layers")
        out.append(li % mm.n_layers)
    if not out:
        raise InputError("layers is empty; give at least one layer")
    if len(set(out)) != len(out):
        raise InputError(f"repeated layers in {list(layers)}")
    return out


def build_batches(mm: Any, ps: PromptSet, batch_size: int) -> list:
    """`PromptBatch`es of at most `batch_size` prompts (one processor encoding each)."""
    if batch_size < 1:
        raise InputError(f"batch_size={batch_size}; must be >= 1")
    return [mm.build_batch(texts, **media) for texts, media in ps.batches(batch_size)]


def score_batches(mm: Any, steerer: Any, batches: Sequence[Any], refusal_ids: Sequence[int]) -> tuple[np.ndarray, dict]:
    """First-token refusal log-odds per prompt under `steerer`, one trace per batch.

    Returns (scores [n] float64, record) where record concatenates the steerer's per-row
    recorded tensors (e.g. MARS's "alpha", "score") over the batches.
    """
    import torch

    from mars_core.scoring import first_token_refusal_score

    scores, recs = [], []
    for b in batches:
        logits, rec = steerer.last_logits(mm, b)
        scores.append(first_token_refusal_score(logits, refusal_ids).numpy())
        recs.append(rec)
    record: dict[str, np.ndarray] = {}
    keys = set.intersection(*(set(r) for r in recs)) if recs else set()
    for k in keys:
        vals = [r[k] for r in recs]
        if all(isinstance(v, torch.Tensor) and v.dim() == 1 for v in vals):
            record[k] = torch.cat([v.to(torch.float64) for v in vals]).numpy()
    return np.concatenate(scores).astype(np.float64), record


def default_judge():
    from mars_core.scoring import SubstringJudge

    return SubstringJudge()


def check_judge(judge: Any):
    if judge is None:
        return default_judge()
    if not callable(getattr(judge, "judge", None)):
        raise InputError(
            f"judge must have judge(prompts, responses) -> list[bool] (mars_core.scoring.Judge), got "
            f"{type(judge).__name__}"
        )
    return judge


def generate_batches(mm: Any, steerer: Any, ps: PromptSet, *, batch_size: int, max_new_tokens: int) -> list[str]:
    """Steered greedy continuations of every prompt of `ps`, one `generate` per batch."""
    outs: list[str] = []
    for texts, media in ps.batches(batch_size):
        outs.extend(steerer.generate(mm, texts, max_new_tokens=max_new_tokens, **media))
    return outs


def judge_generations(mm: Any, steerer: Any, ps: PromptSet, judge: Any, *, batch_size: int,
                      max_new_tokens: int) -> np.ndarray:
    """Judged refusal (1.0 / 0.0) of each prompt's steered generation, [n] float64."""
    outs = generate_batches(mm, steerer, ps, batch_size=batch_size, max_new_tokens=max_new_tokens)
    verdicts = list(judge.judge(ps.texts, outs))
    if len(verdicts) != len(ps):
        raise InputError(f"the judge returned {len(verdicts)} verdicts for {len(ps)} responses")
    return np.asarray([1.0 if bool(v) else 0.0 for v in verdicts], dtype=np.float64)


def resolve_refusal_ids(mm: Any, refusal_ids: Sequence[int] | None) -> list[int]:
    from mars_core.scoring import refusal_token_ids

    return list(refusal_token_ids(mm.tokenizer)) if refusal_ids is None else [int(i) for i in refusal_ids]


StepFactory = Callable[[int, float], Any]
