"""mars_core.datasets: exact NetCDF round trip, clear errors, atomic writes."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr

from analysis import synthetic
from mars_core.datasets import load_dataset, save_dataset
from mars_core.errors import ArtifactError


@pytest.mark.parametrize("name", sorted(synthetic.all_datasets()))
def test_round_trip_is_identical(tmp_path, name):
    ds = synthetic.all_datasets()[name]
    path = save_dataset(ds, tmp_path / f"{name}.nc")
    back = load_dataset(path)
    assert back.identical(ds)
    for v in ds.variables:  # identical() does not compare dtypes
        assert back[v].dtype == ds[v].dtype, v
    assert back.attrs == ds.attrs
    assert {k: type(v) for k, v in back.attrs.items()} == {k: type(v) for k, v in ds.attrs.items()}


def test_round_trip_awkward_values(tmp_path):
    ds = xr.Dataset(
        {"a": (("recenter", "x"), np.array([[1.0, np.nan, 3], [4, 5, 6]]),
               {"units": "days since 2000-01-01", "flag": True, "nested": {"k": [1, None]}}),
         "mask": (("x",), np.array([True, False, True]))},
        coords={"recenter": [False, True], "x": np.array(["a", "bb", "c"], dtype="<U7"),
                "label": ("x", np.array(["u", "v", "w"], dtype=object))},
        attrs={"none": None, "list": [1, "two"], "bool": False, "empty": "", "i": 3,
               "f32": np.float32(2.5), "arr": np.array([1.5, 2.0]), "one": np.array([7]),
               "big": 2**70, "nan": float("nan"), "text": "[1, 2]"},
    )
    back = load_dataset(save_dataset(ds, tmp_path / "x.nc"))
    assert back.identical(ds)
    assert back["recenter"].dtype == bool and back["mask"].dtype == bool
    assert back["x"].dtype == np.dtype("<U7") and back["label"].dtype == object
    assert back["a"].attrs == ds["a"].attrs  # "days since" units not decoded as time
    assert back.attrs["text"] == "[1, 2]" and back.attrs["none"] is None
    assert back.attrs["one"].shape == (1,) and back.attrs["f32"].dtype == np.float32


def test_loaded_dataset_is_in_memory_and_file_closed(tmp_path):
    from xarray.backends.file_manager import FILE_CACHE

    path = save_dataset(synthetic.alignment(), tmp_path / "a.nc")
    back = load_dataset(path)
    assert not any(str(path) in repr(k) for k in FILE_CACHE.keys())
    path.write_bytes(b"overwritten")  # a lazy Dataset would now fail to read
    assert back.identical(synthetic.alignment())


def test_missing_file_is_artifact_error(tmp_path):
    with pytest.raises(ArtifactError, match="does not exist"):
        load_dataset(tmp_path / "nope.nc")


@pytest.mark.parametrize("content", [b"", b"not a netcdf file at all\n", None])
def test_unreadable_file_is_artifact_error(tmp_path, content):
    path = tmp_path / "bad.nc"
    if content is None:  # a truncated real file
        save_dataset(synthetic.spurious(), path)
        path.write_bytes(path.read_bytes()[:300])
    else:
        path.write_bytes(content)
    with pytest.raises(ArtifactError, match="not a readable NetCDF"):
        load_dataset(path)


def _half_write(self, path, **kwargs):
    with open(path, "wb") as f:
        f.write(b"\x89HDF half-written")
    raise RuntimeError("disk full")


def test_failed_write_leaves_no_file(tmp_path, monkeypatch):
    monkeypatch.setattr(xr.Dataset, "to_netcdf", _half_write)
    with pytest.raises(RuntimeError, match="disk full"):
        save_dataset(synthetic.alignment(), tmp_path / "a.nc")
    assert list(tmp_path.iterdir()) == []


def test_failed_overwrite_keeps_old_file(tmp_path, monkeypatch):
    path = save_dataset(synthetic.alignment(), tmp_path / "a.nc")
    before = path.read_bytes()
    monkeypatch.setattr(xr.Dataset, "to_netcdf", _half_write)
    with pytest.raises(RuntimeError, match="disk full"):
        save_dataset(synthetic.stability(), path)
    assert path.read_bytes() == before and list(tmp_path.iterdir()) == [path]
    monkeypatch.undo()
    assert load_dataset(path).identical(synthetic.alignment())


def test_unsupported_attribute_is_refused_before_writing(tmp_path):
    with pytest.raises(TypeError, match="cannot be saved"):
        save_dataset(synthetic.stability().assign_attrs(bad=object()), tmp_path / "s.nc")
    assert list(tmp_path.iterdir()) == []


def test_save_rejects_non_dataset(tmp_path):
    with pytest.raises(TypeError, match="xarray.Dataset"):
        save_dataset(synthetic.alignment()["auc"], tmp_path / "a.nc")
