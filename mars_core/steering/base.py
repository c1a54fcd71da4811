"""The interface every steering method shares, its one read-edit-record step, and generation.

    with mm.nn.trace(batch.inputs):                      # or mm.nn.generate(..., max_new_tokens=k)
        rec = steerer.apply(mm, batch, record=True)      # edits through nnsight; returns saved values
        logits = nnsight.save(mm.logits_envoy.output[:, -1])

    out = steerer.generate(mm, texts, images=None, videos=None, max_new_tokens=32)
    out            # list[str], the generated continuations
    out.alpha      # [batch] strength applied at the first generated token (MARS / ActAdd / AutoSteer)

A last-position steerer edits `layers[l].output[:, -1]` (`[batch, d_model]`) through
`edit_last`: read, compute `(delta, record)`, write `x + delta` (summed in float64), record.
`Steerer.apply` checks the steerer against the model (layer within depth, direction of the
model's d_model) before any envoy is touched, so a mismatch is one clear InputError.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Sequence

import torch

from nnsight.intervention.iterator import Iterations

from ..errors import InputError
from .operator import MODALITIES, SCOPES, add_f64


def layers_of(target: Any, layers_path: str | None):
    """The decoder-layer Envoy list of a MarsModel, or of a bare nnsight model via layers_path."""
    if hasattr(target, "layers") and hasattr(target, "nn"):
        return target.layers
    if layers_path is None:
        raise InputError(
            "apply() got a bare nnsight model but the steerer does not know where its decoder "
            "layers are; pass the MarsModel, or set steerer.layers_path (e.g. 'model.language_model.layers')"
        )
    obj = target
    for part in layers_path.split("."):
        obj = getattr(obj, part)
    return obj


def model_depth_width(target: Any, layers_path: str | None) -> tuple[int, int | None]:
    """(n_layers, d_model) of a MarsModel or a bare nnsight model (d_model None if unknown)."""
    if hasattr(target, "n_layers") and hasattr(target, "d_model"):
        return int(target.n_layers), int(target.d_model)
    n = len(layers_of(target, layers_path))
    cfg = getattr(target, "config", None)
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    d = getattr(cfg, "hidden_size", None)
    return n, (int(d) if d is not None else None)


def modality_of(batch: Any) -> str:
    """"text", "image" or "video" of a PromptBatch (or a modality string; None means text)."""
    if batch is None:
        return "text"
    m = batch if isinstance(batch, str) else getattr(batch, "modality", "text")
    if m not in MODALITIES:
        raise InputError(f"modality {m!r}; use one of {MODALITIES}")
    return m


def check_steps(scope: str, steps: int | None) -> int:
    """Number of forward passes to edit: 1 for scope "first", `steps` (>= 1) for "every"."""
    if scope not in SCOPES:
        raise InputError(f"scope={scope!r}; use one of {SCOPES}")
    if scope == "first":
        return 1
    if steps is None:
        raise InputError(
            "scope='every' edits every forward pass, so apply() needs steps: max_new_tokens inside "
            "mm.nn.generate(...), 1 inside a plain mm.nn.trace(...)"
        )
    steps = int(steps)
    if steps < 1:
        raise InputError(f"steps={steps}; must be >= 1")
    return steps


def new_record(record: Any) -> dict | None:
    """A saved dict to fill, or None. `record` is False/None, True, or a dict the caller saved."""
    if record is None or record is False:
        return None
    if isinstance(record, dict):
        return record
    import nnsight

    return nnsight.save({})


def to_cpu(rec: dict | None) -> dict:
    """A record with every tensor (also inside lists) detached and on the CPU."""
    out = {}
    for k, v in (rec or {}).items():
        if isinstance(v, torch.Tensor):
            out[k] = v.detach().cpu()
        elif isinstance(v, list):
            out[k] = [t.detach().cpu() if isinstance(t, torch.Tensor) else t for t in v]
        else:
            out[k] = v
    return out


def write_record(record: dict | None, values: dict[str, torch.Tensor]) -> None:
    """Keep the first edited step's per-row values (the first generated token) and append
    every step's "alpha" to "alpha_steps"."""
    if record is None:
        return
    if "alpha" not in record:
        for k, v in values.items():
            record[k] = v.cpu()
    record.setdefault("alpha_steps", []).append(values["alpha"].cpu())


def edit_last(layers, layer: int, fn: Callable[[Any], tuple[torch.Tensor, dict]], record: dict | None) -> None:
    """The shared read-edit-record step: x = layers[layer].output[:, -1] ([batch, d_model]);
    (delta, values) = fn(x); write x + delta (float64 sum, x's dtype); record values."""
    x = layers[layer].output[:, -1]
    delta, values = fn(x)
    layers[layer].output[:, -1] = add_f64(x, delta)
    write_record(record, values)


class Steerer:
    """Common interface of every steering method.

    apply(mm, batch=None, *, steps=None, record=False)
        Call INSIDE the caller's `mm.nn.trace(...)` / `mm.nn.generate(...)` block, before any
        read of a later layer (nnsight requires edits in forward order) and outside any
        `tracer.iter` loop. `mm` is the MarsModel (or the bare nnsight model when the steerer
        has `layers_path`); `batch` the PromptBatch (or its modality string, "text" if None).
        `steps`: number of forward passes to edit for per-step methods (max_new_tokens inside
        generate, 1 inside a trace); ignored by first-token methods.
        `record`: False records nothing; True returns a saved dict of per-row values (e.g.
        "alpha", "score"); a dict you created with `nnsight.save({})` is filled in place, which
        survives even when a generation ends before `steps` (nnsight then skips the statements
        after the step loop, including apply's return).
    step(mm, batch=None, *, record=None)
        Edit only the forward pass nnsight is at now. Use it inside your own
        `for _ in tracer.iter[:k]:` loop when you also read per-step values: nnsight allows one
        per-step loop per invoke, and apply(steps=k) runs its own.
    check(mm)
        InputError unless every layer the steerer touches exists in `mm` and its vectors have
        `mm`'s d_model (apply calls it first).
    generate(mm, texts, images=None, videos=None, max_new_tokens=32, *, batch_size=None, remote=False,
             **generate_kwargs)
        Steered generation -> `Generations` (a list of strings with `.alpha`, `.record`,
        `.token_ids`), one padded batch, or chunks of `batch_size` prompts. Greedy unless
        generate_kwargs say otherwise.
    last_logits(mm, batch, *, remote=False) -> (logits [batch, vocab] float32, record dict)
        One steered forward; the next-token logits at the last prompt column.
    fingerprint
        A content hash of everything that determines the steerer's edits (for cache keys).

    Pickled (which is how a steerer travels to NDIF inside a request), a steerer leaves out the
    attributes named in `CLIENT_ONLY`: the xarray Datasets that say how it was fitted. The server
    needs only the operator, and a server need not have xarray; `save` keeps them.
    """

    name = "steerer"
    scope = "first"
    layers_path: str | None = None
    edits_last_position_only = True  # with scope "first": only the last prompt column is edited
    CLIENT_ONLY: tuple[str, ...] = ()

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        for name in self.CLIENT_ONLY:
            if name in state:
                state[name] = None
        return state

    # -- what the steerer touches (for check) ----------------------------------------------
    def layers_used(self) -> tuple[int, ...]:
        """Decoder layers the steerer reads or edits (all layers: override `check`)."""
        return ()

    def vector_size(self) -> int | None:
        """d_model of the steerer's vectors (None: it holds none)."""
        return None

    def check(self, mm: Any) -> None:
        n_layers, d_model = model_depth_width(mm, self.layers_path)
        for layer in self.layers_used():
            if not 0 <= int(layer) < n_layers:
                raise InputError(
                    f"{type(self).__name__} acts at layer {layer} but the model has {n_layers} decoder layers "
                    f"(0..{n_layers - 1}); build it for a layer of this model"
                )
        size = self.vector_size()
        if size is not None and d_model is not None and size != d_model:
            raise InputError(
                f"{type(self).__name__}'s direction has {size} dims but the model's residual stream has "
                f"d_model={d_model}; use directions extracted from this model"
            )

    # -- the edit -------------------------------------------------------------------------
    def apply(self, mm: Any, batch: Any = None, *, steps: int | None = None, record: Any = False):
        steps = check_steps(self.scope, steps)
        self.check(mm)
        rec = new_record(record)
        self.step(mm, batch, record=rec)
        if steps > 1:
            for _ in Iterations()[1:steps]:
                self.step(mm, batch, record=rec)
        return rec

    def step(self, mm: Any, batch: Any = None, *, record: dict | None = None) -> None:
        """Edit the forward pass nnsight is at now (prefill, or the step of an enclosing
        `for _ in tracer.iter[...]` loop)."""
        raise NotImplementedError

    @property
    def fingerprint(self) -> str:
        from ..provenance import fingerprint

        return fingerprint(self._fingerprint_parts())

    def _fingerprint_parts(self) -> Any:
        return {"type": type(self).__name__, "scope": self.scope}

    # -- conveniences ---------------------------------------------------------------------
    def last_logits(self, mm: Any, batch: Any, *, remote: bool | str = False) -> tuple[torch.Tensor, dict]:
        import nnsight

        from ..remote import register_remote

        if remote:
            register_remote()
        with torch.no_grad():
            with mm.nn.trace(batch.inputs, remote=remote):
                rec = nnsight.save({})
                self.apply(mm, batch, steps=1, record=rec)
                logits = nnsight.save(mm.logits_envoy.output[:, -1])
        return logits.detach().float().cpu(), to_cpu(rec)

    def generate(
        self,
        mm: Any,
        texts: Sequence[str],
        images: Sequence[Any] | None = None,
        videos: Sequence[Any] | None = None,
        max_new_tokens: int = 32,
        *,
        batch_size: int | None = None,
        remote: bool | str = False,
        **generate_kwargs: Any,
    ) -> "Generations":
        import nnsight

        from ..remote import register_remote

        texts = list(texts)
        if batch_size is not None and len(texts) > int(batch_size):
            return self._generate_chunked(mm, texts, images, videos, max_new_tokens, int(batch_size), remote,
                                          generate_kwargs)
        if remote:
            register_remote()
        self.check(mm)
        batch = mm.build_batch(texts, images=images, videos=videos)
        generate_kwargs.setdefault("do_sample", False)
        k = int(max_new_tokens)
        with torch.no_grad(), warnings.catch_warnings():
            # A per-step loop bounded at k steps is cut short (with this warning) when every row
            # stops early; the record is filled in place, so nothing is lost.
            warnings.filterwarnings("ignore", message=".*was never reached.*")
            with mm.nn.generate(max_new_tokens=k, remote=remote, **generate_kwargs) as tracer:
                with tracer.invoke(batch.inputs):
                    rec = nnsight.save({})
                    self.apply(mm, batch, steps=k, record=rec)
                with tracer.invoke():
                    ids = nnsight.save(tracer.result)
        new = ids[:, batch.seq_len:].cpu()
        outs = mm.tokenizer.batch_decode(new, skip_special_tokens=True)
        rec = to_cpu(rec)
        return Generations(outs, token_ids=new, record=rec, alpha=rec.get("alpha"))

    def _generate_chunked(self, mm, texts, images, videos, k, bs, remote, kw) -> "Generations":
        """generate() over chunks of `bs` prompts: strings and per-row tensors concatenated, token
        ids right-padded with the pad id; `.record["chunks"]` keeps each chunk's record."""
        parts = []
        for s in range(0, len(texts), bs):
            sl = slice(s, s + bs)
            parts.append(self.generate(mm, texts[sl], None if images is None else list(images)[sl],
                                       None if videos is None else list(videos)[sl], k, remote=remote, **kw))
        width = max(p.token_ids.shape[1] for p in parts)
        pad = mm.tokenizer.pad_token_id if mm.tokenizer.pad_token_id is not None else 0
        ids = torch.cat([torch.nn.functional.pad(p.token_ids, (0, width - p.token_ids.shape[1]), value=pad)
                         for p in parts])
        rec: dict[str, Any] = {"chunks": [p.record for p in parts]}
        for key, v in parts[0].record.items():
            if isinstance(v, torch.Tensor) and all(isinstance(p.record.get(key), torch.Tensor) for p in parts):
                rec[key] = torch.cat([p.record[key] for p in parts])
        return Generations([t for p in parts for t in p], token_ids=ids, record=rec, alpha=rec.get("alpha"))

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Generations(list):
    """A list of generated strings, with `.alpha` ([batch] strength at the first generated token
    or None), `.record` (what apply recorded) and `.token_ids` ([batch, new_tokens])."""

    def __init__(self, texts, *, token_ids=None, record=None, alpha=None):
        list.__init__(self, texts)
        self.token_ids = token_ids
        self.record = record or {}
        self.alpha = alpha
