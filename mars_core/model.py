"""A model under nnsight (`MarsModel`) and the prompt batches it builds (`PromptBatch`).

`mars_core.loading.load_model` wraps any supported transformers model (an object in memory, a
local directory or a hub id) in `nnsight.TransformersModel` and returns a `MarsModel`, which knows
where the language backbone's decoder layers are (`mm.layers[i].output` is
`[batch, pos, d_model]` inside a trace), and builds padded batches of text-only, image or
video prompts with the model's own processor and chat template (`mm.build_batch`).

Conventions:
- Batches are left padded, so the last prompt token of every row sits in column -1 and the
  post-instruction tokens (the chat-template tokens after the user's text, e.g.
  `<end_of_turn>\\n<start_of_turn>model\\n` for Gemma 3) are the same trailing columns
  `batch.post_positions = (-k, ..., -1)` of every row.
- A multimodal batch is one processor encoding passed to a single nnsight invoke
  (`with mm.nn.trace(batch.inputs): ...`); nnsight cannot batch images across invokes.
- Each prompt carries at most one image or one video, placed before the text.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from .errors import InputError, MarsError
from .families import Family, families
from .provenance import config_hash


@dataclass
class PromptBatch:
    """A padded batch ready for one nnsight invoke.

    inputs: processor encoding (input_ids/attention_mask `[batch, seq]`, plus pixel_values,
        image_grid_thw, ... for media); pass it as `mm.nn.trace(batch.inputs)`.
    post_positions: negative column indices of the post-instruction tokens, identical for
        every row (left padding), ending with -1 (the last prompt token).
    post_tokens: the decoded post-instruction tokens (for inspection and tests).
    modality: "text", "image" or "video".
    texts: the user texts; rendered: the chat-template strings fed to the processor.
    """

    inputs: dict[str, torch.Tensor]
    post_positions: tuple[int, ...]
    post_tokens: tuple[str, ...]
    modality: str
    texts: list[str]
    rendered: list[str] = field(repr=False)

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def seq_len(self) -> int:
        return int(self.inputs["input_ids"].shape[1])


class MarsModel:
    """A transformers model under nnsight, with its family's layout.

    Attributes:
        nn: the `nnsight.TransformersModel` (trace / generate / remote through it).
        hf: the underlying transformers model (None for a remote-only meta model).
        processor: multimodal processor, or None for a text-only model.
        tokenizer: the tokenizer (left padding).
        family: the `Family` record.
        n_layers, d_model: decoder layer count and residual width of the language backbone.
        model_id: hub id, "local:<folder name>" for a local directory, or "config:<hash>" for an
            in-memory model (never a local absolute path).
    """

    def __init__(self, nn, family: Family, processor, tokenizer, model_id: str, hf=None):
        self.nn = nn
        self.family = family
        self.processor = processor
        self.tokenizer = tokenizer
        self.hf = hf
        cfg = nn.config
        text_cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
        self.text_config = text_cfg
        self.n_layers = int(text_cfg.num_hidden_layers)
        self.d_model = int(text_cfg.hidden_size)
        self.max_positions = getattr(text_cfg, "max_position_embeddings", None)
        self.config_hash = config_hash(cfg)
        self.model_id = model_id or f"config:{self.config_hash}"
        self._check_layers()

    # -- layout -----------------------------------------------------------------------
    @property
    def layers(self):
        """nnsight Envoy list of the decoder layers; `layers[i].output`: `[batch, pos, d_model]`."""
        return _get_path(self.nn, self.family.layers_path)

    @property
    def logits_envoy(self):
        """Envoy whose `.output` is the logits `[batch, pos, vocab]`."""
        return _get_path(self.nn, self.family.lm_head_path)

    @property
    def supports_image(self) -> bool:
        return self.family.image and self.processor is not None

    @property
    def supports_video(self) -> bool:
        return self.family.video and self.processor is not None

    @property
    def fingerprint(self) -> str:
        """Content hash of the model for cache keys: its id and config hash, plus a hash of every
        parameter for a model held here with at most `WEIGHT_HASH_MAX_PARAMS` parameters (so a
        retrained or edited small model gets a new key). Larger and remote models are keyed by id,
        config and the hub revision transformers loaded (`config._commit_hash`), when known.
        Computed once per MarsModel: edit weights in place, and build a new MarsModel."""
        fp = self.__dict__.get("_fingerprint")
        if fp is None:
            from .provenance import fingerprint

            parts: dict[str, Any] = {"model_id": self.model_id, "config": self.config_hash,
                                     "revision": str(getattr(self.nn.config, "_commit_hash", "") or "")}
            if self.hf is not None and sum(p.numel() for p in self.hf.parameters()) <= WEIGHT_HASH_MAX_PARAMS:
                parts["weights"] = weights_hash(self.hf)
            fp = self.__dict__["_fingerprint"] = fingerprint(parts)
        return fp

    def provenance(self) -> dict[str, Any]:
        """Model provenance fields for saved artifacts."""
        return {
            "model_id": self.model_id,
            "model_config_hash": self.config_hash,
            "family": self.family.name,
            "n_layers": self.n_layers,
            "d_model": self.d_model,
            "dtype": str(self.dtype).replace("torch.", ""),
        }

    @property
    def dtype(self) -> torch.dtype:
        try:
            return next(self.nn._module.parameters()).dtype
        except StopIteration:  # pragma: no cover - parameterless model
            return torch.float32

    def _check_layers(self) -> None:
        mod = _get_path(self.nn._module, self.family.layers_path)
        if len(mod) != self.n_layers:
            raise MarsError(
                f"family {self.family.name!r}: {self.family.layers_path} has {len(mod)} layers but the "
                f"config says num_hidden_layers={self.n_layers}; the family's layers_path is wrong for "
                "this model, register a corrected Family"
            )

    def __repr__(self) -> str:
        return (
            f"MarsModel({self.model_id!r}, family={self.family.name}, n_layers={self.n_layers}, "
            f"d_model={self.d_model})"
        )

    # -- prompts ----------------------------------------------------------------------
    def messages(self, text: str, media: str | None = None) -> list[dict]:
        """Chat messages for one user turn; `media` is None, "image" or "video" (placed first)."""
        if self.processor is None:
            return [{"role": "user", "content": text}]
        content: list[dict] = []
        if media is not None:
            content.append({"type": media})
        content.append({"type": "text", "text": text})
        return [{"role": "user", "content": content}]

    def render(self, text: str, media: str | None = None) -> str:
        """The chat-template string for one prompt, with the generation prompt appended."""
        owner = self.processor if self.processor is not None else self.tokenizer
        if getattr(owner, "chat_template", None) is None:
            raise InputError(
                f"{self.model_id}: the {'processor' if self.processor is not None else 'tokenizer'} "
                "has no chat_template; set one (e.g. processor.chat_template = '...') before building prompts"
            )
        return owner.apply_chat_template(self.messages(text, media), add_generation_prompt=True, tokenize=False)

    def build_batch(
        self,
        texts: Sequence[str],
        images: Sequence[Any] | None = None,
        videos: Sequence[Any] | None = None,
    ) -> PromptBatch:
        """Chat-format, tokenize and left-pad `texts`, each with its image or video if given.

        texts: user messages, one per row. images: one per text (PIL image, `[H, W, 3]` uint8
        array, or a path to an image file). videos: one per text (`[frames, H, W, 3]` uint8
        array or list of PIL frames). Raises InputError for empty prompts, media the family
        does not take, mismatched lengths, missing image files, or prompts longer than the
        model's context.
        """
        texts = _check_texts(texts)
        if images is not None and videos is not None:
            raise InputError("give images or videos, not both: each prompt carries one image or one video")
        modality, media = "text", None
        if images is not None:
            modality, media = "image", "image"
            if not self.supports_image:
                raise InputError(
                    f"{self.model_id} (family {self.family.name}) is a text-only model: it cannot take images. "
                    "Load a multimodal model, or pass texts only"
                )
            images = [_load_image(im, i) for i, im in enumerate(_check_media(images, texts, "images"))]
        if videos is not None:
            modality, media = "video", "video"
            if not self.supports_video:
                kind = "text-only" if self.processor is None else "image-only"
                raise InputError(
                    f"{self.model_id} (family {self.family.name}) is {kind}: it cannot take videos. "
                    "Video-capable families: " + ", ".join(n for n, f in families().items() if f.video)
                )
            videos = [_check_video(v, i) for i, v in enumerate(_check_media(videos, texts, "videos"))]

        rendered = [self.render(t, media) for t in texts]
        suffix = self.template_suffix(media)
        n_post = {self._count_post_tokens(r, suffix) for r in rendered}
        if len(n_post) != 1:
            raise MarsError(
                f"post-instruction token counts differ across prompts ({sorted(n_post)}); the chat "
                "template tokenizes its suffix differently after some user texts. Strip trailing "
                "whitespace from the texts or check the template"
            )
        k = n_post.pop()
        if k < 1:
            raise MarsError(
                f"{self.model_id}: the chat template adds no tokens after the user text; refusal "
                "directions are read at post-instruction positions. Use a chat template with a "
                "generation prompt"
            )

        tok = self.tokenizer
        tok.padding_side = "left"
        add_special = not (tok.bos_token and all(r.startswith(tok.bos_token) for r in rendered))
        kwargs: dict[str, Any] = dict(padding=True, return_tensors="pt", add_special_tokens=add_special)
        if self.processor is None:
            enc = tok(rendered, **kwargs)
        else:
            if getattr(self.processor, "tokenizer", None) is not None:
                self.processor.tokenizer.padding_side = "left"
            if images is not None:
                kwargs["images"] = [[im] for im in images]  # grouped per prompt: every family takes this
            if videos is not None:
                kwargs["videos"] = videos
            enc = self.processor(text=rendered, **kwargs)
        inputs = {key: v for key, v in enc.items() if isinstance(v, torch.Tensor)}
        ids = inputs["input_ids"]
        if self.max_positions is not None and ids.shape[1] > self.max_positions:
            longest = int(inputs["attention_mask"].sum(1).argmax())
            raise InputError(
                f"prompt {longest} is {int(inputs['attention_mask'][longest].sum())} tokens (with the "
                f"chat template and media tokens) but {self.model_id} takes at most {self.max_positions}; "
                "shorten the prompt or use fewer/smaller media"
            )
        post_ids = ids[:, -k:]
        if not bool((post_ids == post_ids[0]).all()):
            raise MarsError(
                "the post-instruction tokens differ across rows of the padded batch; this family's "
                "padding is not left padding. Report this with the model id"
            )
        post_tokens = tuple(tok.convert_ids_to_tokens(post_ids[0].tolist()))
        return PromptBatch(
            inputs=inputs,
            post_positions=tuple(range(-k, 0)),
            post_tokens=post_tokens,
            modality=modality,
            texts=list(texts),
            rendered=rendered,
        )

    def template_suffix(self, media: str | None = None) -> str:
        """The chat template's text after the user turn (with the generation prompt), found from the
        template's structure: what follows a sentinel user text. Cached per media kind."""
        cache = self.__dict__.setdefault("_suffix_cache", {})
        if media not in cache:
            r = self.render(_SENTINEL, media)
            i = r.rfind(_SENTINEL)
            if i < 0:
                raise MarsError(f"{self.model_id}: the chat template drops or rewrites the user text; cannot find "
                                "where the user turn ends (post-instruction positions)")
            cache[media] = r[i + len(_SENTINEL):]
        return cache[media]

    def _count_post_tokens(self, rendered: str, suffix: str) -> int:
        """Number of tokens that start at or after the template suffix in `rendered`."""
        if not rendered.endswith(suffix):
            raise MarsError(
                f"{self.model_id}: the chat template's text after the user turn changes with the user text "
                f"(expected the prompt to end with {suffix!r}); post-instruction positions are undefined for it")
        end = len(rendered) - len(suffix)
        enc = self.tokenizer(rendered, add_special_tokens=False, return_offsets_mapping=True)
        starts = [s for s, e in enc["offset_mapping"] if e > s or s > 0]
        return sum(1 for s in starts if s >= end)


_SENTINEL = "Xq7MARSUSERTEXTq7X"
"""A user text no template alters, used to find where the user turn ends (`template_suffix`)."""


WEIGHT_HASH_MAX_PARAMS = 2_000_000_000
"""Models up to this many parameters are keyed by a hash of their weights (`MarsModel.fingerprint`)."""


def weights_hash(module: Any) -> str:
    """SHA-256 (hex, 16) of every parameter and buffer of a torch module, by name, in order."""
    import hashlib

    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(name.encode() + str(t.dtype).encode() + str(tuple(t.shape)).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def _get_path(root, path: str):
    obj = root
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


# -- input checks -------------------------------------------------------------------------
def _check_texts(texts) -> list[str]:
    if isinstance(texts, str):
        raise InputError("texts must be a list of strings, not one string; wrap it: [text]")
    texts = list(texts)
    if not texts:
        raise InputError("the prompt list is empty; give at least one prompt")
    for i, t in enumerate(texts):
        if not isinstance(t, str) or not t.strip():
            raise InputError(f"prompt {i} is empty or not a string ({t!r}); every prompt needs text")
    return [t.strip() for t in texts]


def _check_media(media, texts, name: str) -> list:
    media = list(media)
    if len(media) != len(texts):
        raise InputError(f"got {len(texts)} texts but {len(media)} {name}; give one per text")
    return media


def _load_image(im, i: int):
    from PIL import Image

    if im is None:
        raise InputError(f"image {i} is None; give a PIL image, an [H, W, 3] uint8 array or a file path")
    if isinstance(im, (str, os.PathLike)):
        p = Path(im)
        if not p.is_file():
            raise InputError(f"image {i}: file {str(p)!r} does not exist; check the path")
        try:
            with Image.open(p) as f:
                return f.convert("RGB")
        except Exception as e:  # PIL raises several types
            raise InputError(f"image {i}: {str(p)!r} is not a readable image ({e})") from e
    if isinstance(im, np.ndarray):
        if im.ndim != 3 or im.shape[-1] != 3:
            raise InputError(f"image {i}: array of shape {im.shape}; expected [H, W, 3]")
        return Image.fromarray(im.astype(np.uint8))
    if isinstance(im, Image.Image):
        return im.convert("RGB")
    raise InputError(f"image {i} is a {type(im).__name__}; give a PIL image, an [H, W, 3] array or a path")


def _check_video(v, i: int):
    from PIL import Image

    if v is None:
        raise InputError(f"video {i} is None; give a [frames, H, W, 3] uint8 array or a list of PIL frames")
    if isinstance(v, (list, tuple)):
        if not v or not all(isinstance(f, Image.Image) for f in v):
            raise InputError(f"video {i}: a list must hold at least one PIL frame")
        return [f.convert("RGB") for f in v]
    if isinstance(v, torch.Tensor):
        v = v.numpy()
    if isinstance(v, np.ndarray):
        if v.ndim != 4 or v.shape[-1] != 3 or v.shape[0] < 1:
            raise InputError(f"video {i}: array of shape {v.shape}; expected [frames, H, W, 3]")
        return v.astype(np.uint8)
    raise InputError(f"video {i} is a {type(v).__name__}; give a [frames, H, W, 3] array or PIL frames")
