"""Fast first-token scoring: the next-token logits of many steerers on one batch.

A first-token steerer edits only the last prompt column, so every earlier column equals the
unsteered forward's: `PrefixCache` runs the prompt minus its last token once and scores each
steerer with one single-token forward over that key/value cache; `first_token_sweep` does that
for a list of steerers on one batch; `PrefixStore` keeps the caches of many batches, keyed by the
batch's content, so several sweeps over the same prompts (fit_mars's two layer passes) prefill once.
"""

from __future__ import annotations

import copy
import hashlib
import warnings
import weakref
from typing import Any, Sequence

import torch

from ..errors import InputError
from .base import Steerer, to_cpu
from .baselines import NoSteer


def _prefix_positions(mm: Any, inputs: dict) -> torch.Tensor | None:
    """The position ids the full (unsteered) trace of `inputs` uses, when the model is not left to
    infer them from cache_position: mrope ids from the model's get_rope_index (Qwen-VL families)
    when the batch has media; nnsight's mask-derived ids for a left-padded text-only batch."""
    import inspect

    from nnsight.modeling.processing import positions

    ids, mask = inputs["input_ids"], inputs.get("attention_mask")
    base = getattr(getattr(mm, "hf", None), "model", None)
    gri = getattr(base, "get_rope_index", None)
    has_media = any(k.startswith("pixel_values") for k in inputs)
    if gri is not None and has_media:
        names = inspect.signature(gri).parameters
        pos, _ = gri(ids, **{k: v for k, v in inputs.items() if k in names and k != "input_ids"})
        return pos
    if not has_media and mask is not None and not bool(mask.all()):
        return positions(mask)
    return None


_VERIFIED: "weakref.WeakKeyDictionary[Any, dict[tuple, bool]]" = weakref.WeakKeyDictionary()
"""model -> {prefix kind: whether its cached path matched a full forward} (check="once")."""


def prefix_kind(inputs: dict) -> tuple:
    """What decides how a cached prefix's positions are computed (`_prefix_positions`): the media
    keys of the batch (mrope ids, image tokens) and, without media, left padding (mask-derived ids)."""
    media = tuple(sorted(k for k in inputs if k.startswith("pixel_values")))
    mask = inputs.get("attention_mask")
    padded = mask is not None and not bool(mask.all())
    return (media, padded and not media)


def cacheable(steerer: Steerer) -> bool:
    """Whether `steerer`'s first-token logits can come from a prompt-prefix cache: it edits the
    last prompt column only, at the first generated token only."""
    return bool(getattr(steerer, "edits_last_position_only", False)) and getattr(steerer, "scope", None) == "first"


class PrefixCache:
    """The unsteered key/value cache of one batch's prompt minus its last token, reused to score
    first-token steerers: `logits(steerer)` costs one single-token forward (nnsight trace) with the
    steerer's edit, instead of a full forward of the prompt.

    `ok` is False when the cache cannot stand in for a full forward: a one-token prompt, or the
    check failed: the cached unsteered logits differ from a full forward's by more than `atol` (a
    family whose positions are computed differently; a warning names it). `logits` then runs the
    full forward (`steerer.last_logits`), so its result never depends on `ok`. check: True
    verifies this batch (one extra full forward); "once" (default) verifies the first batch of
    each kind (`prefix_kind`: media keys, left padding) per model and reuses the verdict; False
    trusts the cache.
    Memory: the cache holds every layer's keys and values of the prompt ([batch, kv_heads,
    seq_len - 1, head_dim] per layer, twice), about `nbytes`.
    """

    def __init__(self, mm: Any, batch: Any, *, check: bool | str = "once", atol: float = 1e-4):
        if check not in (True, False, "once"):
            raise InputError(f"check={check!r}; use True (verify this batch), 'once' or False")
        self.mm, self.batch = mm, batch
        self.cache, self.nbytes = None, 0
        inputs = batch.inputs
        T = batch.seq_len
        self.ok = T >= 2
        if not self.ok:
            return
        ids = inputs["input_ids"]
        seq_keys = [k for k, v in inputs.items() if isinstance(v, torch.Tensor) and v.dim() == 2 and v.shape == ids.shape]
        pos = _prefix_positions(mm, inputs)
        pre = {k: (v[:, :-1] if k in seq_keys else v) for k, v in inputs.items()}
        last = {k: v[:, -1:] for k, v in inputs.items() if k in seq_keys and k != "attention_mask"}
        last.update({k: v for k, v in inputs.items() if k not in seq_keys and not k.startswith("pixel_values")})
        if "attention_mask" in inputs:
            last["attention_mask"] = inputs["attention_mask"]
        last["cache_position"] = torch.tensor([T - 1], device=ids.device)
        if pos is not None:
            pre["position_ids"] = pos[..., :-1]
            last["position_ids"] = pos[..., -1:]
        self._last = last
        kind = prefix_kind(inputs)
        seen = _VERIFIED.setdefault(mm, {}) if check == "once" else {}
        if seen.get(kind) is False:  # this kind already failed its check: no prefill
            self.ok = False
            return
        self.cache = _prefill(mm, pre)
        self.nbytes = sum(t.numel() * t.element_size() for t in _tensors(self.cache))
        if check and kind not in seen:
            ref, _ = NoSteer().last_logits(mm, batch)
            got, _ = self._step(NoSteer())
            err = float((ref - got).abs().max())
            seen[kind] = err <= atol
            if not seen[kind]:
                warnings.warn(
                    f"first-token prefix cache: the cached-prefix forward differs from a full forward by {err:.3g} "
                    f"on {getattr(mm, 'model_id', 'this model')}; using full forwards",
                    stacklevel=3,
                )
        if check and not seen[kind]:
            self.ok, self.cache, self.nbytes = False, None, 0

    def _step(self, st: Steerer) -> tuple[torch.Tensor, dict]:
        return _cached_step(self.mm, self.batch, self._last, self.cache, st)

    def logits(self, steerer: Steerer) -> tuple[torch.Tensor, dict]:
        """Next-token logits at the last prompt column under `steerer`: ([batch, vocab] float32,
        record), equal to `steerer.last_logits(mm, batch)` within float tolerance."""
        if self.ok and cacheable(steerer):
            return self._step(steerer)
        return steerer.last_logits(self.mm, self.batch)


def batch_key(batch: Any) -> str:
    """A content hash of a batch's model inputs (every tensor's name, dtype, shape and bytes):
    equal for two batches the model cannot tell apart."""
    h = hashlib.sha256()
    for k in sorted(batch.inputs):
        v = batch.inputs[k]
        h.update(k.encode())
        if isinstance(v, torch.Tensor):
            t = v.detach().cpu().contiguous().reshape(-1)
            h.update(f"{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        else:
            h.update(repr(v).encode())
    return h.hexdigest()


class PrefixStore:
    """`PrefixCache`s of many batches for one model, keyed by `batch_key` (the batch's content):
    `get(batch)` builds a batch's cache on first use and returns the same one after, so sweeps
    over the same prompts (fit_mars's layer passes before and after the gate) prefill once.

    Memory: every cache is held until `clear()` (or the store is dropped); `nbytes` is their
    total. check / atol: as for `PrefixCache`.
    """

    def __init__(self, mm: Any, *, check: bool | str = "once", atol: float = 1e-4):
        if check not in (True, False, "once"):
            raise InputError(f"check={check!r}; use True (verify each batch), 'once' or False")
        self.mm, self.check, self.atol = mm, check, atol
        self._caches: dict[str, PrefixCache] = {}
        self.hits = self.misses = 0

    def check_model(self, mm: Any, who: str) -> None:
        """Raise InputError when this store belongs to another model than `mm` (`who`: the caller)."""
        if self.mm is not mm:
            raise InputError(f"{who}: the prefix store belongs to another model; make one PrefixStore per model")

    def get(self, batch: Any) -> PrefixCache:
        """The cache of `batch` (built now on first use)."""
        key = batch_key(batch)
        pc = self._caches.get(key)
        if pc is None:
            self.misses += 1
            pc = self._caches[key] = PrefixCache(self.mm, batch, check=self.check, atol=self.atol)
        else:
            self.hits += 1
        return pc

    @property
    def nbytes(self) -> int:
        return sum(pc.nbytes for pc in self._caches.values())

    def __len__(self) -> int:
        return len(self._caches)

    def clear(self) -> None:
        self._caches.clear()


# The traces live in module functions whose frames hold no PrefixCache: a remote request pickles
# the frame's values (and code by value), and the cache object's module state must not travel.
def _prefill(mm: Any, pre: dict, intervene: Any = None):
    """The key/value cache of `pre` (the prompt minus its last token): unsteered, or with
    `intervene(mm)` (an nnsight edit, layers in forward order) applied inside the trace."""
    import nnsight

    with torch.no_grad():
        with mm.nn.trace(pre, use_cache=True):
            if intervene is not None:
                intervene(mm)
            cache = nnsight.save(mm.nn.output.past_key_values)
    return cache


def _cached_step(mm: Any, batch: Any, last: dict, cache: Any, st: Steerer) -> tuple[torch.Tensor, dict]:
    """One single-token forward of the last prompt token over a copy of `cache`, with `st`'s edit."""
    import nnsight

    step_inputs = dict(last, past_key_values=copy.deepcopy(cache), use_cache=True)
    with torch.no_grad(), warnings.catch_warnings():
        # transformers 5.2x renames `past_key_values` to `cache` (a FutureWarning per call);
        # the old name is what every supported version accepts
        warnings.filterwarnings("ignore", message=".*past_key_values.*deprecated.*")
        with mm.nn.trace(step_inputs):
            rec = nnsight.save({})
            st.apply(mm, batch, steps=1, record=rec)
            lg = nnsight.save(mm.logits_envoy.output[:, -1])
    return lg.detach().float().cpu(), to_cpu(rec)


def _tensors(x: Any):
    """Every tensor inside a (nested) key/value cache object."""
    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, (list, tuple)):
        for y in x:
            yield from _tensors(y)
    elif isinstance(x, dict):
        for y in x.values():
            yield from _tensors(y)
    elif hasattr(x, "layers"):  # transformers' DynamicCache: .layers[i].keys / .values
        for lay in x.layers:
            yield from _tensors([getattr(lay, "keys", None), getattr(lay, "values", None)])
    elif hasattr(x, "key_cache"):
        yield from _tensors([x.key_cache, x.value_cache])


def first_token_sweep(mm: Any, batch: Any, steerers: Sequence[Steerer], *, reuse_prefix: bool | None = None,
                      check: bool | str = "once", atol: float = 1e-4,
                      store: PrefixStore | None = None) -> tuple[torch.Tensor, list[dict]]:
    """Next-token logits at the last prompt column for each steerer: ([S, batch, vocab] float32, records).

    With reuse_prefix, a `PrefixCache` of the batch is built once (one prefill) and each
    first-token steerer costs one single-token forward over it: the whole sweep costs about one
    prefill plus one decoding step per steerer. Steerers that edit other positions (directional
    ablation) get a full forward. The cached path is verified against a full unsteered forward
    (max |logit difference| <= atol; `PrefixCache`'s check: "once" per model and kind of batch,
    True for this batch); if it disagrees, the sweep falls back to full forwards with a warning.
    reuse_prefix=None (default): reuse it when the traces run locally, not when they run remotely
    (`mars_core.remote`), where the key/value cache would travel down and up again with every
    steerer; remotely each steerer is one full-forward request that returns only its logits.
    """
    from ..remote import resolve

    if reuse_prefix is None:
        reuse_prefix = not resolve(mm)
    steerers = list(steerers)
    if reuse_prefix and any(cacheable(st) for st in steerers):
        if store is not None:
            store.check_model(mm, "first_token_sweep")
        pc = store.get(batch) if store is not None else PrefixCache(mm, batch, check=check, atol=atol)
        outs = [pc.logits(st) for st in steerers]
    else:
        outs = [st.last_logits(mm, batch) for st in steerers]
    return torch.stack([o[0] for o in outs]), [o[1] for o in outs]
