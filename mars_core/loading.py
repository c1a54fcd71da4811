"""Loading a model through nnsight: `load_model` (an in-memory model, a local directory or a hub id).

It wraps the transformers model in `nnsight.TransformersModel` and returns a `MarsModel`
(`mars_core.model`). A hub id that is not in the local Hugging Face cache fails at once with an
InputError when the hub cannot be reached (no retry storm); a cached one loads from the cache.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import torch

from .errors import InputError
from .families import Family, family_for_config, get_family
from .model import MarsModel

def load_model(
    model_or_id: Any,
    processor: Any = None,
    *,
    family: str | None = None,
    dtype: torch.dtype | str | None = None,
    device_map: str | None = None,
    remote: bool = False,
    trust_remote_code: bool = False,
    model_id: str | None = None,
    **kwargs: Any,
) -> MarsModel:
    """Wrap a supported model in nnsight and return a `MarsModel`.

    model_or_id: a transformers `PreTrainedModel` in memory, a local directory, or a hub id
        (downloaded by transformers when the hub is reachable; with `remote=True` only the
        config is fetched and the model runs on NDIF).
    processor: the multimodal processor (or, for text-only models, the tokenizer). Required
        for an in-memory model; loaded with `AutoProcessor`/`AutoTokenizer` for an id.
    family: force a registered family instead of matching `config.model_type`.
    dtype, device_map: passed to `from_pretrained` for an id (e.g. torch.bfloat16, "auto").
    model_id: the id recorded in provenance (default: the hub id; "local:<folder name>" for a local
        directory; "config:<hash>" for an in-memory model, never a local absolute path).
    Offline: a hub id not in the local Hugging Face cache fails at once with an InputError (no
        retries) when the hub cannot be reached; a cached one loads from the cache.
    remote: True runs every top-level trace of the model on NDIF (hub ids only; needs
        NDIF_API_KEY), "local" simulates that round trip in this process (any model); see
        `mars_core.remote.use_remote` and docs/ndif.md.
    """
    import nnsight
    import transformers

    from .remote import check_reachable, configure, normalize_mode, use_remote

    remote = normalize_mode(remote)
    if remote and remote != "local":
        configure(remote)  # a missing key fails here, before anything is fetched
        if isinstance(model_or_id, (str, os.PathLike)) and not os.path.isdir(str(model_or_id)):
            check_reachable(remote)  # an unreachable server fails here, before the model is built

    if isinstance(model_or_id, (str, os.PathLike)):
        source = str(model_or_id)
        local_dir = os.path.isdir(source)
        offline = False if local_dir else _hub_offline(source)
        hub = dict(trust_remote_code=trust_remote_code, **({"local_files_only": True} if offline else {}))
        try:
            config = transformers.AutoConfig.from_pretrained(source, **hub)
        except (OSError, ValueError) as e:
            raise InputError(f"cannot load the config of {source!r}: {str(e).splitlines()[0]} Give a hub id "
                             "(org/name) or a local model directory") from None
        fam = get_family(family) if family else family_for_config(config)
        if processor is None:
            loader = transformers.AutoProcessor if fam.image else transformers.AutoTokenizer
            processor = loader.from_pretrained(source, **hub)
        model_id = model_id or (f"local:{Path(source).resolve().name}" if local_dir else source)
        tokenizer, proc = _split_processor(processor, fam, model_id)
        load_kwargs = dict(kwargs)
        if dtype is not None:
            load_kwargs["dtype"] = _as_dtype(dtype)
        if device_map is not None:
            load_kwargs["device_map"] = device_map
        # offline: the hub's offline switch, not local_files_only= (nnsight hands that to the pipeline
        # as a model kwarg, which collides with the pipeline's own local_files_only)
        with _hub_offline_mode(offline):
            nn = nnsight.TransformersModel(
                source,
                task="image-text-to-text" if proc is not None else "text-generation",
                processor=proc,
                tokenizer=tokenizer,
                dispatch=remote in (False, "local"),
                trust_remote_code=trust_remote_code,
                **load_kwargs,
            )
        ndif = remote not in (False, "local")
        mm = MarsModel(nn, fam, proc, tokenizer, model_id, hf=None if ndif else nn._module)
        if remote:  # every top-level trace in this mode; the package's code travels by value
            use_remote(mm, remote)
        return mm

    if not isinstance(model_or_id, torch.nn.Module) or not hasattr(model_or_id, "config"):
        raise InputError(
            f"load_model takes a transformers PreTrainedModel, a local path or a hub id, not "
            f"{type(model_or_id).__name__}"
        )
    hf = model_or_id
    fam = get_family(family) if family else family_for_config(hf.config)
    if processor is None:
        raise InputError(
            f"an in-memory {type(hf).__name__} needs its processor (or tokenizer for text-only models): "
            "load_model(model, processor)"
        )
    tokenizer, proc = _split_processor(processor, fam, getattr(hf.config, "_name_or_path", "") or "model")
    nn = nnsight.TransformersModel(
        hf,
        task="image-text-to-text" if proc is not None else "text-generation",
        processor=proc,
        tokenizer=tokenizer,
    )
    name = model_id or getattr(hf.config, "_name_or_path", "") or ""
    if not model_id and (os.path.isabs(name) or os.path.isdir(name)):
        name = ""  # a local path is not an id: provenance uses "config:<hash>" (pass model_id= to name it)
    mm = MarsModel(nn, fam, proc, tokenizer, name, hf=hf)
    if remote:  # NDIF refuses an in-memory model (InputError); "local" simulates
        use_remote(mm, remote)
    return mm


_HUB_REACHABLE: dict[str, bool] = {}


@contextlib.contextmanager
def _hub_offline_mode(on: bool):
    """Within the block, huggingface_hub treats the hub as offline (cache only) when `on`."""
    from huggingface_hub import constants

    before = constants.HF_HUB_OFFLINE
    if on:
        constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before


def _hub_reachable() -> bool:
    """Whether the Hugging Face hub answers a TCP connect within 3 s (cached per process)."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return False
    url = urlparse(constants.ENDPOINT)
    host = url.hostname or "huggingface.co"
    if host not in _HUB_REACHABLE:
        try:
            socket.create_connection((host, url.port or (443 if url.scheme == "https" else 80)), timeout=3).close()
            _HUB_REACHABLE[host] = True
        except OSError:
            _HUB_REACHABLE[host] = False
    return _HUB_REACHABLE[host]


def _hub_offline(model_id: str) -> bool:
    """True when the hub is unreachable and `model_id` is in the local cache (load from it);
    InputError when it is unreachable and the model is not cached; False when online."""
    if _hub_reachable():
        return False
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(model_id, "config.json")
    if isinstance(cached, str):
        return True
    raise InputError(
        f"model {model_id!r} is not a local directory and not in the Hugging Face cache, and the hub cannot be "
        "reached (offline); download it where there is network (`huggingface-cli download "
        f"{model_id}`) and point HF_HOME at that cache, or give a local model directory")


def _split_processor(processor, fam: Family, model_id: str):
    """(tokenizer, processor-or-None) from what the user gave."""
    tokenizer = getattr(processor, "tokenizer", None)
    if tokenizer is None:  # a bare tokenizer
        if fam.image:
            raise InputError(
                f"{model_id} is a multimodal {fam.name} model but was given a tokenizer, not its "
                "processor; pass the processor (transformers.AutoProcessor) so images and videos work"
            )
        tokenizer, processor = processor, None
    elif not fam.image:
        processor = None
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer, processor


def _as_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return getattr(torch, str(dtype).replace("torch.", ""))
    except AttributeError:
        raise InputError(f"unknown dtype {dtype!r}; use e.g. 'bfloat16', 'float16' or 'float32'") from None


