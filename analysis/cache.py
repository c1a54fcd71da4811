"""A step cache keyed by inputs, so an interrupted pipeline resumes where it stopped.

Each step's result is saved under `root/<name>-<key>.<suffix>` (a file, or a folder when the
step saves several files), where `key` hashes everything that determines the result (for the
study's steps: the content fingerprint of every value the step reads, `analysis.graph`) and the
package version. The result is written under a temporary name and renamed into place, so a
crash never leaves a half-written entry under the final name. A rerun with the same inputs
loads the entry instead of recomputing; `fresh=True` ignores (and overwrites) cached entries.
An unreadable cached entry is recomputed, never trusted.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Callable, TypeVar

from mars_core._version import __version__

T = TypeVar("T")
log = logging.getLogger(__name__)


def cache_key(**inputs: Any) -> str:
    """Hex digest (16 chars) of the JSON of `inputs` plus the package version."""
    blob = json.dumps({"mars_version": __version__, **inputs}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class StepCache:
    """Load-or-compute for pipeline steps. `events` records (name, "reused"|"computed", path)."""

    def __init__(self, root: str | Path, fresh: bool = False):
        self.root = Path(root)
        self.fresh = fresh
        self.events: list[tuple[str, str, Path]] = []

    def path(self, name: str, key: str, suffix: str) -> Path:
        return self.root / f"{name}-{key}.{suffix}"

    def get(
        self,
        name: str,
        inputs: dict[str, Any],
        compute: Callable[[], T],
        save: Callable[[T, Path], Any],
        load: Callable[[Path], T],
        suffix: str,
    ) -> T:
        """The cached result of step `name` for `inputs`, computing and saving it if needed."""
        path = self.path(name, cache_key(step=name, **inputs), suffix)
        if path.exists() and not self.fresh:
            try:
                value = load(path)
            except Exception as e:  # a damaged file is recomputed, never trusted
                log.warning("cached %s unreadable (%s); recomputing", path, e)
            else:
                self.events.append((name, "reused", path))
                return value
        value = compute()
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        _remove(tmp)
        try:
            save(value, tmp)
            if path.is_dir():
                shutil.rmtree(path)
            os.replace(tmp, path)
        finally:
            _remove(tmp)
        self.events.append((name, "computed", path))
        return value


def _remove(p: Path) -> None:
    if p.is_dir():
        shutil.rmtree(p)
    elif p.exists():
        p.unlink()
