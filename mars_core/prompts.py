"""Prompt sets: texts with optional images or videos, plus a content hash for provenance.

A `PromptSet` is the unit every extraction, steering run and analysis takes: `name`
("harmful_image", ...), `texts` (user messages), at most one of `images` / `videos` (one per
text), and `harmful` (True, False, or None for neutral/unlabelled sets). `meta` holds extra fields; a
list with one entry per prompt (e.g. `meta["concepts"]`, reference answers) is per-prompt
and follows `subset`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from .errors import InputError


@dataclass
class PromptSet:
    """Texts with optional per-text media. `modality` is "text", "image" or "video"."""

    name: str
    texts: list[str]
    images: list[Any] | None = None
    videos: list[Any] | None = None
    harmful: bool | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.texts = list(self.texts)
        if not self.texts:
            raise InputError(f"prompt set {self.name!r} is empty; give at least one prompt")
        if self.images is not None and self.videos is not None:
            raise InputError(f"prompt set {self.name!r}: give images or videos, not both")
        for media, what in ((self.images, "images"), (self.videos, "videos")):
            if media is not None and len(media) != len(self.texts):
                raise InputError(
                    f"prompt set {self.name!r} has {len(self.texts)} texts but {len(media)} {what}; "
                    "give one per text"
                )
        if self.images is not None:
            self.images = list(self.images)
        if self.videos is not None:
            self.videos = list(self.videos)

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def modality(self) -> str:
        if self.images is not None:
            return "image"
        if self.videos is not None:
            return "video"
        return "text"

    def media_kwargs(self, sl: slice | None = None) -> dict[str, Any]:
        """`{"images": ...}` / `{"videos": ...}` / `{}` for `mm.build_batch` (optionally sliced)."""
        sl = sl or slice(None)
        if self.images is not None:
            return {"images": self.images[sl]}
        if self.videos is not None:
            return {"videos": self.videos[sl]}
        return {}

    def batches(self, batch_size: int):
        """Yield `(texts, media_kwargs)` chunks of at most `batch_size` prompts."""
        if batch_size < 1:
            raise InputError(f"batch_size={batch_size}; must be >= 1")
        for s in range(0, len(self), batch_size):
            sl = slice(s, s + batch_size)
            yield self.texts[sl], self.media_kwargs(sl)

    def subset(self, idx: Sequence[int] | slice, name: str | None = None) -> "PromptSet":
        """A new set holding the rows `idx`."""
        if isinstance(idx, slice):
            idx = range(len(self))[idx]
        idx = list(idx)
        pick = lambda xs: None if xs is None else [xs[i] for i in idx]  # noqa: E731
        meta = {k: pick(v) if self._per_prompt(v) else v for k, v in self.meta.items()}
        return PromptSet(name or self.name, pick(self.texts), pick(self.images), pick(self.videos),
                         self.harmful, meta)

    def _per_prompt(self, value: Any) -> bool:
        """A meta entry is per-prompt (and follows subsets) when it is a list/tuple of len(self)."""
        return isinstance(value, (list, tuple)) and len(value) == len(self)

    @property
    def sha256(self) -> str:
        """Order-sensitive hash of the texts and media pixels (hex, 16 chars)."""
        h = hashlib.sha256()
        for i, t in enumerate(self.texts):
            h.update(t.encode("utf-8") + b"\x00")
            for media in (self.images, self.videos):
                if media is not None:
                    h.update(_media_bytes(media[i]))
        return h.hexdigest()[:16]

    @property
    def fingerprint(self) -> str:
        """Content hash of everything a computation can read from the set: texts, media pixels,
        the harmful label and `meta` (not the name)."""
        from .provenance import fingerprint

        return fingerprint({"sha256": self.sha256, "harmful": self.harmful, "modality": self.modality,
                            "meta": _meta_for_hash(self.meta)})

    def provenance(self) -> dict[str, Any]:
        return {f"{self.name}_sha256": self.sha256, f"{self.name}_n": len(self)}


def _meta_for_hash(meta: dict) -> Any:
    """`meta` with values the fingerprint cannot hash (e.g. arbitrary objects) replaced by their repr."""
    import json

    try:
        from .provenance import fingerprint

        fingerprint(meta)
        return meta
    except TypeError:
        return json.dumps(meta, sort_keys=True, default=repr)


def _media_bytes(m: Any) -> bytes:
    if isinstance(m, (str, bytes)):
        return str(m).encode()
    if isinstance(m, (list, tuple)):
        return b"".join(_media_bytes(x) for x in m)
    return np.asarray(m).tobytes()
