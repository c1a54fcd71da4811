"""Running the package's traces on NDIF (nnsight remote execution), and a local dry run of it.

Modes (the `remote=` argument everywhere, `--remote [ndif|local]` on the command line):
  False    local execution (the default; nothing here is involved).
  True     NDIF: each request is serialized, sent to the NDIF host (nnsight's `CONFIG.API.HOST`,
           overridable with the NDIF_HOST environment variable) and run there against the
           hosted model; only values marked with `nnsight.save` come back.
  "local"  nnsight's local simulation: the request is serialized and deserialized with
           non-server modules hidden, then run in this process. It needs no key and no
           network, and catches code that would not survive the trip to the server.

The API key. `configure` reads it from the environment variable NDIF_API_KEY (the variable
nnsight itself reads, see `nnsight.schema.config.Config._from_env`), or failing that takes
the key nnsight already holds (`nnsight.CONFIG.API.APIKEY`, loaded from nnsight's user
config file, e.g. one written by `nnsight.login`). It sets the key on nnsight's in-memory config
only: it never calls `CONFIG.save()` / `CONFIG.set_default_api_key()` (both write the key to
`$XDG_CONFIG_HOME/nnsight/config.yaml`), never prints or logs it, and an `ApiKey` masks
itself in repr/str and refuses to be pickled. nnsight sends it only as the `ndif-api-key`
HTTP header; a serialized request never contains it (nnsight's Tracer drops its backend when
pickled). `redact` masks it in any text (the CLI passes its error messages through it).

A model-wide default. `use_remote(mm, mode)` (called by `load_model(..., remote=...)` and by
the CLI for `--remote`) makes every top-level `mm.nn.trace` / `mm.nn.generate` /
`mm.nn.session` that does not name `remote=` or `backend=` itself run in that mode, so code
that knows nothing about remote execution (calibration, layer selection, the analyses)
runs its traces on NDIF unchanged. Traces nested in a session or another trace are never
redirected (they run wherever the enclosing block runs). This is done with a small hook on
`nnsight.modeling.mixins.remotable.Remotable.trace/session`, installed on first use, that
only acts on models registered here.

Batching. `session_map(mm, fn, items, remote=mode)` runs `fn(mm, item)` (each opening its
own `mm.nn.trace`) for many items inside one `mm.nn.session(remote=mode)` per
`per_session` items: one NDIF request instead of one per trace, with intermediate values
kept on the server and only what `fn` returns (saved) downloaded. `collect_activations` and
`scoring.last_logits_many` / `refusal_scores_many` use it when remote.
"""

from __future__ import annotations

import functools
import os
import weakref
from typing import Any, Callable, Iterable, Mapping, Sequence

import nnsight
import torch

from .errors import InputError

ENV_KEY = "NDIF_API_KEY"
"""The environment variable holding the NDIF API key (the same one nnsight reads)."""

MODES = ("ndif", "local")
SESSION_BATCHES = 8
"""Default number of traces (prompt batches) sent in one NDIF request by `session_map`."""

MISSING_KEY = (
    "remote execution on NDIF needs an API key and none was found: set the environment "
    f"variable {ENV_KEY} (get a key at https://login.ndif.us), e.g. `export {ENV_KEY}=...`. "
    "Use --remote local (remote=\"local\") to dry-run the same requests in this process without a key"
)

_MASK = "********"


# ============================================================================ the key
class ApiKey:
    """An API key that does not show itself: repr/str are masked, pickling is refused.

    `reveal()` returns the key (only `configure` calls it, to hand the key to nnsight's
    in-memory config). `source` says where it was found (never the value).
    """

    __slots__ = ("_value", "source")

    def __init__(self, value: str, source: str = ""):
        if not isinstance(value, str) or not value.strip():
            raise InputError("an NDIF API key must be a non-empty string")
        object.__setattr__(self, "_value", value.strip())
        object.__setattr__(self, "source", source)

    def reveal(self) -> str:
        return self._value

    def __setattr__(self, name, value):  # immutable
        raise AttributeError("ApiKey is read-only")

    def __repr__(self) -> str:
        return f"ApiKey({_MASK}, source={self.source!r})"

    __str__ = __repr__

    def __format__(self, spec: str) -> str:
        return repr(self)

    def __eq__(self, other) -> bool:
        return isinstance(other, ApiKey) and other._value == self._value

    def __hash__(self) -> int:
        return hash((ApiKey, self._value))

    def __reduce__(self):
        raise TypeError("an NDIF API key is never serialized (it travels only as an HTTP header)")


def find_api_key(environ: Mapping[str, str] | None = None) -> ApiKey | None:
    """The NDIF API key: $NDIF_API_KEY, else the key nnsight loaded from its own config; or None."""
    env = os.environ if environ is None else environ
    value = (env.get(ENV_KEY) or "").strip()
    if value:
        return ApiKey(value, f"environment variable {ENV_KEY}")
    from nnsight.schema.config import CONFIG

    value = (CONFIG.API.APIKEY or "").strip()
    if value:
        return ApiKey(value, "nnsight's config (nnsight.CONFIG.API.APIKEY)")
    return None


def redact(text: Any, environ: Mapping[str, str] | None = None) -> str:
    """`str(text)` with every known API key (environment, nnsight's config) replaced by a mask."""
    s = str(text)
    env = os.environ if environ is None else environ
    keys = {(env.get(ENV_KEY) or "").strip()}
    try:
        from nnsight.schema.config import CONFIG

        keys.add((CONFIG.API.APIKEY or "").strip())
    except Exception:  # pragma: no cover - nnsight always importable here
        pass
    for k in sorted((k for k in keys if k), key=len, reverse=True):
        s = s.replace(k, _MASK)
    return s


# ============================================================================ modes
def normalize_mode(remote: Any) -> bool | str:
    """False, True (NDIF) or "local" from the accepted spellings.

    False/None/""/"off" -> False; True/"ndif"/"remote" -> True; "local" -> "local"; an
    http(s) URL -> that URL (an NDIF host overriding nnsight's CONFIG.API.HOST).
    """
    if remote is None or remote is False or remote == "" or remote == "off":
        return False
    if remote is True or remote in ("ndif", "remote"):
        return True
    if remote == "local":
        return "local"
    if isinstance(remote, str) and remote.startswith(("http://", "https://")):
        return remote
    raise InputError(f"remote={remote!r}; use False, True (NDIF), 'local' (simulate in-process) or an NDIF host URL")


def is_ndif(mode: Any) -> bool:
    """True when `mode` sends requests to an NDIF server (not the local simulation)."""
    m = normalize_mode(mode)
    return bool(m) and m != "local"


def configure(remote: Any = True, *, environ: Mapping[str, str] | None = None) -> bool | str:
    """Prepare this process for `remote` and return the normalized mode.

    NDIF modes: find the key (InputError with instructions if there is none), give it to
    nnsight's in-memory config (never written to disk), register this package for by-value
    pickling. "local": the same, but a missing key is fine (the simulation sends nothing).
    """
    mode = normalize_mode(remote)
    if not mode:
        return False
    key = find_api_key(environ)
    if key is None and mode != "local":
        raise InputError(MISSING_KEY)
    if key is not None:
        from nnsight.schema.config import CONFIG

        # In memory only: CONFIG.save()/set_default_api_key() would write config.yaml.
        CONFIG.API.APIKEY = key.reveal()
    register_remote()
    return mode


def register_remote() -> None:
    """Register `mars_core` with nnsight so remote requests carry its code by value.

    NDIF servers do not have this package; `nnsight.register(mars_core)` makes every request
    that references a steerer ship the package's classes and functions as source. Idempotent.
    """
    import mars_core

    nnsight.register(mars_core)


# ============================================================================ the server
def ndif_host(remote: Any = True) -> str:
    """The NDIF base URL a request in mode `remote` goes to: the URL itself, else nnsight's
    `CONFIG.API.HOST` (default the hosted NDIF; the NDIF_HOST environment variable at import)."""
    m = normalize_mode(remote)
    if isinstance(m, str) and m != "local":
        return m.rstrip("/")
    from nnsight.schema.config import CONFIG

    return str(CONFIG.API.HOST).rstrip("/")


def check_reachable(remote: Any = True, *, timeout: float = 5.0) -> str:
    """Ask the NDIF server of mode `remote` for `/ping` before any work; return its URL.

    InputError naming the URL and the fix when it does not answer (refused, unknown host, timeout)
    or answers with an error status. No key is sent.
    """
    import urllib.error
    import urllib.request

    host = ndif_host(remote)
    try:
        with urllib.request.urlopen(host + "/ping", timeout=timeout) as r:
            status = r.status
    except urllib.error.HTTPError as e:
        status = e.code
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise InputError(f"the NDIF server at {host} cannot be reached ({reason}); check the address "
                         "(NDIF_HOST, or remote='http://host:port') and that the server is running") from None
    if status >= 400:
        raise InputError(f"the NDIF server at {host} answered /ping with HTTP {status}; it is up but not serving "
                         "requests (see the server's logs)")
    return host


def remote_failure(exc: BaseException, remote: Any = True) -> str | None:
    """One line explaining a failed remote request, or None when `exc` is not one.

    RemoteError: the server ran the block and it failed: the server's own last line, with the
    user's line it points at; it could not deploy the model: the loader's reason (first line);
    a connection failure: which server;
    UnboundLocalError / NameError after a remote block: a value used after the block was not marked
    with `nnsight.save` (the server returns saved values only).
    """
    from nnsight.intervention.backends.remote import RemoteError

    if isinstance(exc, RemoteError):
        text = str(exc)
        if text.startswith("Could not deploy"):
            # ndif's deployment reason: the loader's own sentence, then the server's traceback (its
            # paths; ndif cuts the whole at 1,500 characters, so the traceback's last line is cut)
            first = text.splitlines()[0]
            head = first.removeprefix("Could not deploy this model.").strip() or first
            return redact(f"the NDIF server at {ndif_host(remote)} could not deploy the model: {head}")
        lines = [ln for ln in text.splitlines() if ln.strip()]
        last = lines[-1].strip() if lines else type(exc).__name__
        frames = [i for i, ln in enumerate(lines) if ln.lstrip().startswith('File "')]
        where = ""
        if frames:
            i = frames[-1]
            code = lines[i + 1].strip() if i + 1 < len(lines) and not lines[i + 1].lstrip().startswith("File") else ""
            loc = lines[i].strip()
            if "site-packages" not in loc:
                where = f" (at {loc}{': ' + code if code else ''})"
        return redact(f"the NDIF server at {ndif_host(remote)} reported: {last}{where}")
    if isinstance(exc, (ConnectionError, TimeoutError)) or type(exc).__module__.startswith(("requests", "websocket",
                                                                                              "urllib3", "socketio")):
        return redact(f"lost the connection to the NDIF server at {ndif_host(remote)} ({type(exc).__name__}: {exc}); "
                      "check that it is running, then rerun (finished steps are cached)")
    if isinstance(exc, (UnboundLocalError, NameError)):
        return (f"{exc}: a value computed inside a remote trace was used after it without being marked with "
                "nnsight.save(...) (NDIF returns saved values only)")
    return None


# ============================================================================ model-wide default
_DEFAULTS: dict[int, Any] = {}
_HOOKED = "_mars_remote_default"


def _trace_depth() -> int:
    from nnsight.tracing import tracer as _tr

    return int(getattr(_tr._local, "depth", 0))


def _default_for(nn: Any) -> Any:
    if not _DEFAULTS or _trace_depth() > 0:  # nested blocks run where the enclosing one runs
        return False
    return _DEFAULTS.get(id(nn), False)


def _install_hook() -> None:
    from nnsight.modeling.mixins.remotable import Remotable

    if getattr(Remotable.trace, _HOOKED, False):
        return
    orig_trace, orig_session = Remotable.trace, Remotable.session

    @functools.wraps(orig_trace)
    def trace(self, *inputs, backend=None, remote=False, **kwargs):
        if backend is None and not remote:
            remote = _default_for(self)
        return orig_trace(self, *inputs, backend=backend, remote=remote, **kwargs)

    @functools.wraps(orig_session)
    def session(self, backend=None, remote=False, **kwargs):
        if backend is None and not remote:
            remote = _default_for(self)
        return orig_session(self, backend=backend, remote=remote, **kwargs)

    setattr(trace, _HOOKED, True)
    setattr(session, _HOOKED, True)
    Remotable.trace = trace
    Remotable.session = session


def _hub_id(mm: Any) -> str:
    return str(getattr(getattr(mm, "nn", None), "repo_id", "") or "")


def use_remote(mm: Any, remote: Any = True) -> bool | str:
    """Make `remote` the default of every top-level trace/generate/session of `mm.nn`.

    Configures the key and the package registration (`configure`). NDIF needs a model
    loaded by hub id (`load_model("org/name", remote=True)`): an in-memory model or a local
    directory raises InputError. `use_remote(mm, False)` switches the default off.
    Returns the normalized mode, also stored as `mm.remote`.
    """
    mode = normalize_mode(remote)
    if mode and mode != "local":
        hub = _hub_id(mm)
        if not hub:
            raise InputError(
                f"{getattr(mm, 'model_id', 'this model')} was built in memory; NDIF runs models it hosts, "
                "named by hub id: load_model('org/name', remote=True). Use remote='local' to simulate"
            )
        if os.path.isdir(hub):
            raise InputError(
                f"{hub!r} is a local directory; NDIF runs models it hosts, named by hub id (e.g. "
                "llava-hf/llava-1.5-7b-hf). Use remote='local' to simulate with a local copy"
            )
    mode = configure(mode)
    nn = mm.nn
    if mode:
        _install_hook()
        if id(nn) not in _DEFAULTS:
            weakref.finalize(nn, _DEFAULTS.pop, id(nn), None)
        _DEFAULTS[id(nn)] = mode
    else:
        _DEFAULTS.pop(id(nn), None)
    try:
        mm.remote = mode
    except AttributeError:  # pragma: no cover - a bare nnsight model with slots
        pass
    return mode


def remote_default(mm: Any) -> bool | str:
    """The default mode `use_remote` set for `mm` (False if none)."""
    return _DEFAULTS.get(id(getattr(mm, "nn", mm)), False)


def resolve(mm: Any, remote: Any = False) -> bool | str:
    """The mode a trace of `mm` opened here would run in: `remote` if given, else the model's
    default (`use_remote`), and False inside an enclosing trace or session."""
    mode = normalize_mode(remote)
    if mode:
        return mode
    return _default_for(getattr(mm, "nn", mm))


# ============================================================================ sessions
def _chunks(items: Sequence[Any], n: int) -> Iterable[Sequence[Any]]:
    for s in range(0, len(items), n):
        yield items[s : s + n]


def session_map(
    mm: Any,
    fn: Callable[[Any, Any], Any],
    items: Iterable[Any],
    *,
    remote: Any = False,
    per_session: int = SESSION_BATCHES,
    combine: Callable[[Any, Any], Any] | None = None,
) -> Any:
    """[fn(mm, item) for item in items], with the calls batched into nnsight sessions.

    fn(mm, item) opens its own `mm.nn.trace(...)` WITHOUT remote= (inside a session the
    traces run where the session runs) and returns what should come back (tensors, lists,
    dicts, numbers). With combine (an associative fn(a, b)), results are folded where the
    model runs and one value is returned (less to download). Remote (the given mode or the
    model's default): one `mm.nn.session(remote=mode)` request per `per_session` items, so
    fn, combine and the items travel with the request (they must be torch/numpy data and
    code of this package or other code registered with `nnsight.register`). Local: fn is
    simply called item by item.
    """
    items = list(items)
    mode = resolve(mm, remote)
    if not mode:
        out = [fn(mm, item) for item in items]
        return out if combine is None else functools.reduce(combine, out)
    per_session = int(per_session)
    if per_session < 1:
        raise InputError(f"per_session={per_session}; must be >= 1")
    configure(mode)
    parts: list[Any] = []
    for chunk in _chunks(items, per_session):
        with torch.no_grad():
            with mm.nn.session(remote=mode):
                res = nnsight.save([])
                # no temporaries in the session body: nnsight returns the body's locals whose
                # id() is in the saved set, and a fresh result can reuse a freed saved tensor's
                # address, which would send it back a second time
                for item in chunk:
                    if combine is not None and res:
                        res[0] = combine(res[0], fn(mm, item))
                    else:
                        res.append(fn(mm, item))
        parts.extend(res)
    return parts if combine is None else functools.reduce(combine, parts)


# ============================================================================ command line
def add_remote_args(parser) -> None:
    """Add `--remote [ndif|local]` to an argparse parser (dest "remote")."""
    parser.add_argument(
        "--remote",
        nargs="?",
        const="ndif",
        default=None,
        choices=MODES,
        metavar="{ndif,local}",
        help=(
            f"run the model's traces on NDIF (needs {ENV_KEY} in the environment and a hub --model); "
            "'--remote local' serializes every request as for NDIF but runs it in this process (no key, "
            "no network): a dry run"
        ),
    )


def remote_from_args(args, *, ndif_ok: bool = True, what: str = "") -> bool | str:
    """The mode for parsed `args` (False, True or "local"), checked before anything loads.

    NDIF needs a key (InputError naming NDIF_API_KEY) and a hub --model; `ndif_ok=False`
    (commands whose model NDIF cannot host, e.g. `mars smoke`) turns --remote ndif into an
    InputError. `what` names the command in messages.
    """
    mode = normalize_mode(getattr(args, "remote", None))
    if not mode:
        return False
    what = what or f"mars {getattr(args, 'command', '')}".strip()
    if mode != "local":
        if not ndif_ok:
            raise InputError(f"{what} runs a model built in this process, which NDIF cannot host; "
                             "use --remote local to simulate the remote path")
        model = getattr(args, "model", None)
        if model in (None, "organism"):
            raise InputError(
                f"{what} --remote needs a hub model id (--model org/name): the built-in organism is not "
                "hosted on NDIF (mars extract / mars steer take --remote local to dry-run the remote path on it)"
            )
        if os.path.isdir(str(model)):
            raise InputError(f"--model {model!r} is a local directory; NDIF runs hosted models named by hub id")
    return configure(mode)
