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
