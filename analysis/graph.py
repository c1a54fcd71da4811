"""A step graph whose cache keys are the content of everything each step reads.

A `Step` wraps a plain function; its inputs ARE its parameters: `run_steps` calls
`step.fn(**{p: values[name]})` with exactly the graph values its parameters name (sources given
by the caller, or the outputs of earlier steps), and keys the cached result by the
`mars_core.provenance.fingerprint` of each of them. A step therefore cannot read something its
key does not cover, and a value passed on (a fitted gate inside a MARS operator) is an input like
any other: nothing is written back into shared settings.

    steps = [Step("directions", directions_fn, save, load, "safetensors"), ...]
    values = run_steps(steps, sources, StepCache(out / ".mars_cache"), targets=["comparison"])

`bind` renames parameters to graph names, so one function serves two steps (e.g. the same
directions function on a model variant: `bind={"mm": "variant_offset"}`).
"""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from mars_core.errors import InputError
from mars_core.provenance import fingerprint

from .cache import StepCache


@dataclasses.dataclass(frozen=True)
class Step:
    """One cached computation: `fn(**reads)`; `write(value, path)` / `read(path, reads)` persist
    it under `<name>-<key>.<suffix>`. (Not `save` / `load`: nnsight gives every object a `save`
    attribute, which a dataclass would take for a field default.)"""

    name: str
    fn: Callable[..., Any]
    write: Callable[[Any, Path], Any]
    read: Callable[[Path, dict], Any]
    suffix: str
    bind: Mapping[str, str] = dataclasses.field(default_factory=dict)
    describe: str = ""

    @property
    def params(self) -> tuple[str, ...]:
        return tuple(inspect.signature(self.fn).parameters)

    @property
    def reads(self) -> tuple[str, ...]:
        """The graph names this step reads (its parameters, renamed by `bind`)."""
        return tuple(self.bind.get(p, p) for p in self.params)


def check_graph(steps: Sequence[Step], sources: Iterable[str]) -> None:
    """InputError unless step names are unique and every step reads only sources or EARLIER steps."""
    known = set(sources)
    names = [s.name for s in steps]
    if len(set(names)) != len(names):
        raise InputError(f"duplicate step names in {names}")
    for s in steps:
        missing = [r for r in s.reads if r not in known]
        if missing:
            raise InputError(f"step {s.name!r} reads {missing}, which is neither a source nor an earlier step")
        known.add(s.name)


def dependents(steps: Sequence[Step], changed: Iterable[str]) -> set[str]:
    """Names of the steps that read any of `changed`, directly or through other steps."""
    out: set[str] = set()
    dirty = set(changed)
    for s in steps:
        if dirty & set(s.reads):
            out.add(s.name)
            dirty.add(s.name)
    return out


def needed(steps: Sequence[Step], targets: Iterable[str] | None) -> list[Step]:
    """The steps `targets` need (all steps for None), in graph order."""
    if targets is None:
        return list(steps)
    by_name = {s.name: s for s in steps}
    unknown = [t for t in targets if t not in by_name]
    if unknown:
        raise InputError(f"unknown steps {unknown}; the graph has {list(by_name)}")
    want: set[str] = set()
    todo = list(targets)
    while todo:
        t = todo.pop()
        if t in want:
            continue
        want.add(t)
        todo.extend(r for r in by_name[t].reads if r in by_name)
    return [s for s in steps if s.name in want]


def step_key(step: Step, values: Mapping[str, Any]) -> dict[str, Any]:
    """What the cache key of `step` hashes: the fingerprint of every value it reads and the source
    of its function (editing a step recomputes it; a change deeper in the library is covered by
    the package version in every key, or by `fresh=True`)."""
    return {"reads": {p: fingerprint(values[r]) for p, r in zip(step.params, step.reads)},
            "code": _source_hash(step.fn)}


def _source_hash(fn: Callable) -> str:
    fn = inspect.unwrap(fn)
    try:
        src = inspect.getsource(fn)
    except (OSError, TypeError):  # built in, or defined where the source is not available
        src = f"{getattr(fn, '__module__', '')}.{getattr(fn, '__qualname__', repr(fn))}"
    return fingerprint(src)


def run_steps(steps: Sequence[Step], sources: Mapping[str, Any], cache: StepCache, *,
              targets: Iterable[str] | None = None,
              on_step: Callable[[Step, str], None] | None = None) -> dict[str, Any]:
    """Run (or load) the steps `targets` need, in order; returns the sources plus every step's
    value. `on_step(step, "computed" | "reused")` is called after each step."""
    check_graph(steps, sources)
    values = dict(sources)
    for step in needed(steps, targets):
        kwargs = {p: values[r] for p, r in zip(step.params, step.reads)}
        before = len(cache.events)
        values[step.name] = cache.get(step.name, step_key(step, values), lambda: step.fn(**kwargs),
                                      step.write, lambda p: step.read(p, kwargs), step.suffix)
        if on_step is not None:
            on_step(step, cache.events[-1][1] if len(cache.events) > before else "computed")
    return values
