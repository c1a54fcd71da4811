"""StepCache: reuse by key, recompute on change, on --fresh and on a damaged file."""

import json

from analysis.cache import StepCache, cache_key


def _io():
    save = lambda v, p: p.write_text(json.dumps(v))  # noqa: E731
    load = lambda p: json.loads(p.read_text())  # noqa: E731
    return save, load


def test_reuse_and_invalidate(tmp_path):
    calls = []

    def compute(v):
        def f():
            calls.append(v)
            return {"v": v}
        return f

    save, load = _io()
    c = StepCache(tmp_path)
    assert c.get("step", {"a": 1}, compute(1), save, load, "json") == {"v": 1}
    assert c.get("step", {"a": 1}, compute(99), save, load, "json") == {"v": 1}  # reused
    assert c.get("step", {"a": 2}, compute(2), save, load, "json") == {"v": 2}  # new inputs
    assert calls == [1, 2]
    assert [e[1] for e in c.events] == ["computed", "reused", "computed"]
    fresh = StepCache(tmp_path, fresh=True)
    assert fresh.get("step", {"a": 1}, compute(3), save, load, "json") == {"v": 3}
    # a damaged file is recomputed
    path = c.path("step", cache_key(step="step", a=2), "json")
    path.write_text("{not json")
    assert StepCache(tmp_path).get("step", {"a": 2}, compute(4), save, load, "json") == {"v": 4}
    assert calls == [1, 2, 3, 4]


def test_key_depends_on_every_input():
    assert cache_key(a=1, b=[1, 2]) == cache_key(b=[1, 2], a=1)
    assert cache_key(a=1, b=[1, 2]) != cache_key(a=1, b=[2, 1])
