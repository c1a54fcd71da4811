"""Provenance records, content hashes and atomic writes.

Everything the package saves carries a provenance dict (flat, str/int/float values so it
fits NetCDF and safetensors metadata): package version, model id or config hash, creation
time, seed, dataset hashes. Writes go to a temporary file in the target directory and are
renamed into place, so a crash never leaves a half-written file under the final name.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator

from ._version import __version__


def sha256_text(items: Iterable[str]) -> str:
    """Order-sensitive SHA-256 of a sequence of strings (e.g. a prompt set), hex, 16 chars."""
    h = hashlib.sha256()
    for s in items:
        b = s.encode("utf-8")
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()[:16]


def sha256_bytes(data: bytes) -> str:
    """SHA-256 of raw bytes, hex, 16 chars."""
    return hashlib.sha256(data).hexdigest()[:16]


def fingerprint(obj: Any) -> str:
    """Content hash (hex, 16 chars) of nested data, for cache keys: str / int / float / bool /
    None, lists and tuples (ordered), dicts (by sorted key), torch tensors and numpy arrays (dtype,
    shape and bytes), and any object with a `fingerprint` attribute (its own hash). Equal content
    gives an equal hash; anything else raises TypeError (so nothing unhashed slips into a key)."""
    h = hashlib.sha256()
    _feed(h, obj)
    return h.hexdigest()[:16]


def _feed(h: Any, obj: Any) -> None:
    import numpy as np

    fp = getattr(obj, "fingerprint", None)
    if fp is not None and not isinstance(obj, type):
        h.update(b"F" + str(fp).encode())
    elif obj is None or isinstance(obj, (bool, int, float, str)):
        h.update(b"P" + type(obj).__name__.encode() + b":" + repr(obj).encode() + b";")
    elif isinstance(obj, (list, tuple)):
        h.update(b"L%d[" % len(obj))
        for x in obj:
            _feed(h, x)
        h.update(b"]")
    elif isinstance(obj, dict):
        h.update(b"D%d{" % len(obj))
        for k in sorted(obj, key=str):
            _feed(h, str(k))
            _feed(h, obj[k])
        h.update(b"}")
    elif type(obj).__module__.startswith("torch") and hasattr(obj, "detach"):
        import torch

        t = obj.detach().cpu().contiguous()
        h.update(b"T" + str(t.dtype).encode() + str(tuple(t.shape)).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(obj, (np.ndarray, np.generic)):
        a = np.ascontiguousarray(obj)
        h.update(b"A" + a.dtype.str.encode() + str(a.shape).encode() + a.tobytes())
    else:
        raise TypeError(f"cannot fingerprint a {type(obj).__name__}; give it a `fingerprint` attribute")


def config_hash(config: Any) -> str:
    """Stable hash of a transformers config (its JSON diff-free dict), hex, 16 chars."""
    d = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    d = {k: v for k, v in d.items() if k not in {"transformers_version", "_name_or_path"}}
    return sha256_bytes(json.dumps(d, sort_keys=True, default=str).encode())


def now_iso() -> str:
    """UTC creation time, ISO 8601, seconds precision."""
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def make_provenance(**fields: Any) -> dict[str, Any]:
    """A provenance dict: `mars_version` and `created` plus the given fields.

    Values must be str, int, float or bool (NetCDF/safetensors-safe); None becomes "".
    Lists/dicts are JSON-encoded.
    """
    out: dict[str, Any] = {"mars_version": __version__, "created": now_iso()}
    for k, v in fields.items():
        if v is None:
            v = ""
        elif isinstance(v, (list, tuple, dict)):
            v = json.dumps(v, sort_keys=True, default=str)
        elif not isinstance(v, (str, int, float, bool)):
            v = str(v)
        out[k] = v
    return out


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success rename it onto `path`.

    On any exception the temporary file is removed and `path` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_path, 0o666 & ~umask)  # mkstemp makes 0600; give the usual file mode
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write text atomically; returns the final path."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write JSON (indented, sorted keys) atomically; returns the final path."""
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def save_tensor_file(path: str | os.PathLike, tensors: dict, meta: dict[str, str], *, fmt: str, version: str,
                     provenance: dict[str, Any]) -> Path:
    """Write `tensors` to a safetensors file atomically, with string metadata `meta` plus the
    format name/version and the provenance (as JSON). Tensors are stored bit-exact."""
    from safetensors.torch import save_file

    full = {"format": fmt, "format_version": version, **meta,
            "provenance": json.dumps(provenance, sort_keys=True, default=str)}
    path = Path(path)
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=full)
    return path


def read_tensor_file(path: str | os.PathLike, *, fmt: str, version: str, what: str,
                     required: Iterable[str] = ()) -> tuple[dict, dict[str, str], dict[str, Any]]:
    """(tensors, metadata, provenance) of a file written by `save_tensor_file`.

    ArtifactError naming `what` and the problem when the file is missing, unreadable, of another
    format or version, lacks a `required` tensor or has corrupt provenance."""
    from safetensors import safe_open

    from .errors import ArtifactError

    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"No {what} file at {path}.")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != fmt:
                raise ArtifactError(f"{path} is not a {what} file (format={meta.get('format')!r}, expected {fmt!r}).")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except ArtifactError:
        raise
    except Exception as e:  # safetensors raises SafetensorError / OSError on corrupt files
        raise ArtifactError(f"Cannot read the {what} from {path}: {e}") from e
    if meta.get("format_version") != version:
        raise ArtifactError(f"{path} has format version {meta.get('format_version')!r}; this mars reads {version!r}.")
    missing = [k for k in required if k not in tensors]
    if missing:
        raise ArtifactError(f"{path} lacks tensors {missing}; the file is incomplete.")
    try:
        prov = json.loads(meta.get("provenance", "{}"))
    except ValueError as e:
        raise ArtifactError(f"{path} has corrupt provenance metadata: {e}") from e
    return tensors, meta, prov
