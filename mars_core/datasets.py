"""Labelled xarray Datasets: variables with units, provenance attributes, exact NetCDF round trip.

Every Dataset the package writes (analyses, MARS layer / gate selection, `mars evaluate`) is
built with `var` (every data variable carries `long_name` and `units`) and `dataset_provenance`
(model id or config hash, package version, creation time, seed, prompt-set hashes), and saved
with `save_dataset`.

NetCDF attributes hold only strings, numbers and 1-D numeric arrays, and h5netcdf refuses
booleans. `save_dataset` therefore JSON-encodes every other attribute value (bool, None,
list, dict, arrays) and records in one global attribute, `mars_io_encoding`, which attributes
were encoded and the exact dtype of string and time variables. `load_dataset` undoes this, so
`load_dataset(save_dataset(ds, p)).identical(ds)`. Tuples come back as lists.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from .errors import ArtifactError
from .provenance import atomic_path, now_iso
from ._version import __version__

ENGINE = "h5netcdf"
META_KEY = "mars_io_encoding"
_GLOBAL = ""  # key of the Dataset's own attrs in the metadata
_INT64 = (-(2**63), 2**63)
_NEEDS_H5PY = "reading/writing NetCDF datasets needs h5netcdf with h5py: pip install h5py"


def _encode_attr(value: Any) -> tuple[Any, Any]:
    """(stored value, tag); tag None means stored as is."""
    if isinstance(value, str):
        return str(value), None
    if isinstance(value, (bool, np.bool_)) or value is None:
        return json.dumps(bool(value) if value is not None else None), "json"
    if isinstance(value, int) and _INT64[0] <= value < _INT64[1]:
        return value, None
    if isinstance(value, float):
        return value, None
    if isinstance(value, np.generic) and value.dtype.kind in "iuf":
        return value, ["scalar", value.dtype.str]
    if isinstance(value, np.ndarray) and value.dtype.kind in "biufUSO":
        return json.dumps(value.tolist()), ["ndarray", value.dtype.str, list(value.shape)]
    try:
        return json.dumps(value), "json"
    except (TypeError, ValueError) as e:
        raise TypeError(
            f"attribute value {value!r} of type {type(value).__name__} cannot be saved to "
            "NetCDF exactly; use str, int, float, bool, None, numpy arrays or JSON-able "
            "lists/dicts"
        ) from e


def _decode_attr(value: Any, tag: Any) -> Any:
    if tag is None:
        return value.item() if isinstance(value, np.generic) else value
    if tag == "json":
        return json.loads(value)
    if tag[0] == "scalar":
        return np.dtype(tag[1]).type(value)
    if tag[0] == "ndarray":
        return np.asarray(json.loads(value), dtype=np.dtype(tag[1])).reshape(tag[2])
    raise ArtifactError(f"unknown attribute encoding {tag!r}; file written by a newer version?")


def _encode_attrs(attrs: dict, tags: dict, name: str) -> dict:
    out, mine = {}, {}
    for k, v in attrs.items():
        out[k], tag = _encode_attr(v)
        if tag is not None:
            mine[k] = tag
    if mine:
        tags[name] = mine
    return out


def var(dims, data: Any, long_name: str, units: str) -> tuple:
    """A data-variable tuple `(dims, float64 array, {"long_name", "units"})` for `xr.Dataset`."""
    return (tuple(dims), np.asarray(data, dtype=np.float64), {"long_name": long_name, "units": units})


def dataset_provenance(analysis: str, mm: Any = None, prompt_sets: dict | None = None, *, seed: int | None = None,
                       **extra: Any) -> dict[str, Any]:
    """Provenance attrs of a Dataset: `analysis`, `mars_version`, `created`, the model's provenance
    (`mm.provenance()`: model_id, model_config_hash, family, n_layers, d_model, dtype), `seed`, and
    per prompt set `{label}_sha256` / `{label}_n` (and `{label}_name` for a PromptSet; a plain list
    of strings is hashed as text). `extra` values may be str, numbers, bools, lists or dicts: they
    are stored as they are (`save_dataset` encodes them once, `load_dataset` decodes them)."""
    from .provenance import sha256_text

    out: dict[str, Any] = {"analysis": analysis, "mars_version": __version__, "created": now_iso()}
    if mm is not None:
        out.update(mm.provenance())
    else:
        out.update(model_id="", model_config_hash="")
    out["seed"] = "" if seed is None else int(seed)
    for label, ps in (prompt_sets or {}).items():
        if hasattr(ps, "sha256"):
            out[f"{label}_sha256"], out[f"{label}_n"], out[f"{label}_name"] = ps.sha256, len(ps), ps.name
        else:
            texts = list(ps)
            out[f"{label}_sha256"], out[f"{label}_n"] = sha256_text(texts), len(texts)
    for k, v in extra.items():  # lists/dicts as they load back (tuples become lists), so a round trip is exact
        out[k] = "" if v is None else (json.loads(json.dumps(v, default=str)) if isinstance(v, (list, tuple, dict)) else v)
    return out


def save_dataset(ds: xr.Dataset, path: str | os.PathLike) -> Path:
    """Write `ds` to `path` as NetCDF-4 (h5netcdf), atomically; returns the path."""
    if not isinstance(ds, xr.Dataset):
        raise TypeError(f"save_dataset expects an xarray.Dataset, got {type(ds).__name__}")
    if META_KEY in ds.attrs:
        raise ValueError(f"attribute name {META_KEY!r} is reserved by mars_core.datasets")
    tags: dict[str, dict] = {}
    dtypes, times = {}, []
    out = ds.copy(deep=False)
    for name, var in ds.variables.items():
        out.variables[name].attrs = _encode_attrs(var.attrs, tags, str(name))
        if var.dtype.kind in "OUS":
            dtypes[str(name)] = var.dtype.str
        elif var.dtype.kind in "mM":
            times.append(str(name))
    out.attrs = _encode_attrs(ds.attrs, tags, _GLOBAL)
    out.attrs[META_KEY] = json.dumps({"version": 1, "attrs": tags, "dtypes": dtypes,
                                      "times": times}, sort_keys=True)
    path = Path(path)
    with atomic_path(path) as tmp:
        try:
            out.to_netcdf(tmp, engine=ENGINE)
        except ImportError as e:
            raise ImportError(_NEEDS_H5PY) from e
    return path


def _restore(ds: xr.Dataset, meta: dict) -> xr.Dataset:
    if meta.get("version") != 1:
        raise ArtifactError(f"unknown {META_KEY} version {meta.get('version')!r}")
    if meta["times"]:
        ds = xr.decode_cf(ds, decode_times={n: n in meta["times"] for n in ds.variables},
                          decode_timedelta={n: n in meta["times"] for n in ds.variables})
    for name, dt in meta["dtypes"].items():
        ds = ds.assign_coords({name: ds[name].astype(dt)}) if name in ds.coords else \
            ds.assign({name: ds[name].astype(dt)})
    for name, var in ds.variables.items():
        tags = meta["attrs"].get(str(name), {})
        var.attrs = {k: _decode_attr(v, tags.get(k)) for k, v in var.attrs.items()}
    tags = meta["attrs"].get(_GLOBAL, {})
    ds.attrs = {k: _decode_attr(v, tags.get(k)) for k, v in ds.attrs.items()}
    return ds


def load_dataset(path: str | os.PathLike) -> xr.Dataset:
    """Read a Dataset written by `save_dataset`, fully into memory (the file is closed).

    Raises `ArtifactError` if the file is missing or is not a readable NetCDF file.
    """
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"dataset file {path} does not exist; run the analysis that "
                            "writes it (e.g. `mars analyze`) or check the path")
    try:
        ds = xr.load_dataset(path, engine=ENGINE, decode_times=False, decode_timedelta=False)
    except ImportError as e:
        raise ImportError(_NEEDS_H5PY) from e
    except Exception as e:  # h5py/h5netcdf raise OSError, ValueError, KeyError, ...
        raise ArtifactError(f"dataset file {path} is not a readable NetCDF-4 file "
                            f"({type(e).__name__}: {e}); delete it and rerun the analysis "
                            "that writes it") from e
    raw = ds.attrs.pop(META_KEY, None)
    if raw is None:
        return ds
    try:
        meta = json.loads(raw)
    except (TypeError, ValueError) as e:
        raise ArtifactError(f"dataset file {path} has a corrupt {META_KEY} attribute") from e
    return _restore(ds, meta)
