"""A fake NDIF for the fast test suite: nnsight's real client against a server process that
runs requests the way the NDIF server does.

What it reproduces of NDIF
  * The server side (`ndif_fake_server.py`, a separate `python -I` process in which the
    packages named in `block` cannot be imported, so the code a request needs must travel
    in it): the payload is rebuilt with `RequestModel.deserialize` (zstd-decompressed if the
    request says `compress`) against the process's own model, the request's `env` is applied
    (`_remoteable_set_env`), the block runs on a worker thread inside a trace scope
    (inc/dec), with the model's parameters frozen (`requires_grad_(False)`) but grad mode on,
    and ONLY THE VALUES MARKED WITH `.save()` / `nnsight.save` come back: the locals of the
    block's frame whose identity is in nnsight's saved set. Every other value stays on the
    server, exactly as on NDIF. The result is `torch.save` of that dict (tensors moved to the
    CPU, a class that arrived by value going back as a reference to the client's class,
    classes/functions born in the block by value), zstd-compressed (level 3) when the
    request asks. Prints and warnings while the block runs go back as LOG responses; the
    status sequence is RECEIVED (the POST's reply), QUEUED, RUNNING, then COMPLETED, whose
    pickled `ResponseModel` carries the result bytes inline (NDIF does this on the websocket
    when the result is small enough), or ERROR with the user's traceback (nnsight internals
    and server frames removed) or, for a payload that cannot be read, a one-sentence reason.
    linecache and nnsight's SOURCES/BLOCKS are restored after each request.
  * The client side is nnsight's own `RemoteBackend`, unchanged except for the transport:
    `__call__`, `_serialize` (pull_env + `RequestModel.serialize(tracer, compress)`), the
    `request` loop, `parse`, `handle`/`note` (RemoteError on ERROR), `download_result` ->
    `finalize` (zstd decompression under the request's flag, `torch.load`) and `_push`
    (mark the returned values saved, write them into the caller's frame). Only `_post` (the
    HTTP POST) and `websocket.create_connection` are replaced, by the pipe to the process.
    So code that forgets a save fails here as it does on NDIF: the name is never bound after
    the block (UnboundLocalError/NameError) or keeps the value it had before it.

What it does not reproduce
  HTTP and the websocket themselves (headers, the API key: nothing is authenticated and
  the key is never sent to the process), the queue, the object store (results always come
  back inline; non-blocking `blocking=False` requests and polling are refused), the model
  rebuilt from the model key (the process loads a local checkpoint directory in its saved
  dtype, on the CPU, so no autocast), timeouts, cancellation, the sandbox for untrusted
  code, version gating, and a by-value fallback for a returned class the client cannot
  resolve by name.

Use
    server = FakeNDIF(model_dir, workdir, block=("mars_core",))
    server.install(monkeypatch)       # remote=True traces and sessions go to the fake
    ...                               # or: mm.nn.trace(inputs, backend=server.backend())
    server.close()

`server.n`, `server.blobs` (payloads), `server.replies` (the `meta` of every final
response: "saved" names, "blocked_loaded" modules, ...) and `server.responses` (every
`ResponseModel`) record what went over the pipe.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterable
from unittest import mock

import torch
from nnsight.intervention.backends import remote as _remote
from nnsight.intervention.backends.remote import RemoteBackend
from nnsight.schema.response import ResponseModel, Status

from ndif_fake_server import read_frame, write_frame

SERVER = Path(__file__).with_name("ndif_fake_server.py")


class FakeNDIFBackend(RemoteBackend):
    """nnsight's RemoteBackend with its HTTP POST and websocket replaced by the fake's pipe."""

    def __init__(self, server: "FakeNDIF", *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not self.blocking:
            raise NotImplementedError("the fake NDIF has no object store: blocking requests only")
        self.server = server

    def _post(self, request, blob: bytes) -> ResponseModel:
        return self.server.post(request, blob)

    def request(self, request, tracer):
        import websocket

        with mock.patch.object(websocket, "create_connection", self.server.subscribe):
            return super().request(request, tracer)


class _Connection:
    """What `websocket.create_connection` returns, reading the fake's frames."""

    def __init__(self, server: "FakeNDIF") -> None:
        self.server = server

    def recv(self):
        return self.server.receive()

    def settimeout(self, timeout) -> None:  # recv blocks; the status spinner just does not spin
        pass

    def close(self) -> None:
        pass


class FakeNDIF:
    """A long-lived fake NDIF server process (see the module docstring)."""

    def __init__(self, model_dir: Path, workdir: Path, *, block: Iterable[str] = ("mars_core",),
                 auto_class: str = "AutoModelForImageTextToText", task: str | None = "image-text-to-text",
                 processor: bool = True, strict: bool = True) -> None:
        self.d = Path(workdir)
        self.block = tuple(block)
        self.strict = strict  # fail a request whose run imported a blocked package
        self.err = open(self.d / "server.err", "w")
        env = {k: v for k, v in os.environ.items() if k != "NDIF_API_KEY"}
        cmd = [sys.executable, "-I", str(SERVER), str(model_dir), "--auto-class", auto_class,
               "--threads", str(torch.get_num_threads()), "--processor" if processor else "--no-processor"]
        cmd += ["--task", task] if task else []
        for b in self.block:
            cmd += ["--block", b]
        self.proc = subprocess.Popen(cmd, cwd=self.d, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.err)
        hello = json.loads(self._read())
        self.importable: dict[str, bool] = hello["importable"]
        assert not hello["blocked_loaded"], hello
        self.n = 0
        self.blobs: list[bytes] = []
        self.replies: list[dict] = []
        self.responses: list[ResponseModel] = []

    # -- the pipe -----------------------------------------------------------------------
    def _read(self):
        frame = read_frame(self.proc.stdout)
        if frame is None:
            self.err.flush()
            raise AssertionError(f"fake NDIF died:\n{(self.d / 'server.err').read_text()[-4000:]}")
        return frame

    def _write(self, payload) -> None:
        write_frame(self.proc.stdin, payload)

    # -- the transport the backend uses ---------------------------------------------------
    def subscribe(self, url: str, header: Any = None) -> _Connection:
        """`websocket.create_connection(f"{host}/subscribe", header=...)`: the first message
        is the session id. The header (the API key) is not forwarded."""
        self._write(json.dumps({"op": "subscribe"}))
        return _Connection(self)

    def post(self, request, blob: bytes) -> ResponseModel:
        """The HTTP POST of a request: payload in, the RECEIVED response back."""
        self.n += 1
        self.blobs.append(blob)
        self._write(json.dumps({"op": "request", "request": request.metadata(),
                                "threads": torch.get_num_threads()}))
        self._write(blob)
        return ResponseModel.model_validate_json(self.receive())

    def receive(self):
        """The next frame, as the websocket would deliver it (str, or bytes for a pickled
        COMPLETED response); recorded on the way."""
        frame = self._read()
        if not (isinstance(frame, str) and frame.startswith('{"session_id"')):
            response = RemoteBackend.parse(frame)
            self.responses.append(response)
            if response.status in (Status.COMPLETED, Status.ERROR):
                meta = dict(response.meta or {})
                meta["status"] = response.status.value
                self.replies.append(meta)
                if self.strict and meta.get("blocked_loaded"):
                    raise AssertionError(f"the request imported blocked packages on the server: "
                                         f"{meta['blocked_loaded']}")
        return frame

    # -- using it -----------------------------------------------------------------------
    def backend(self, model_key: str = "fake.Model:model", **kwargs: Any) -> FakeNDIFBackend:
        """A RemoteBackend for `trace(..., backend=...)` / `session(backend=...)`."""
        return FakeNDIFBackend(self, model_key, **kwargs)

    def install(self, monkeypatch) -> None:
        """Route every `remote=True` (or host URL) trace/session to this fake: the model's own
        `_remote_backend` builds the backend (model key, env, blocking, verbose) as usual,
        of a RemoteBackend subclass whose transport is this process."""
        server = self

        class Bound(FakeNDIFBackend):
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                super().__init__(server, *args, **kwargs)

        monkeypatch.setattr(_remote, "RemoteBackend", Bound)

    def close(self) -> None:
        try:
            self._write(json.dumps({"op": "exit"}))
            self.proc.stdin.close()
            self.proc.wait(timeout=60)
        except Exception:
            self.proc.kill()
            self.proc.wait()
        self.err.close()


def module_without_saves(module, tmp_path: Path):
    """A copy of `module` (a mars_core module) with every `nnsight.save(` call removed, imported
    from a file (nnsight reads a trace's source from its file) as a sibling module. The caller
    removes it from sys.modules when done. Used to check that deleting a save fails against
    both this fake and the real server (tests/test_ndif.py)."""
    import importlib.util
    import inspect

    src = inspect.getsource(module)
    assert "nnsight.save(" in src
    name = module.__name__ + "_nosave"
    path = tmp_path / (name.rsplit(".", 1)[1] + ".py")
    path.write_text(src.replace("nnsight.save(", "("))
    spec = importlib.util.spec_from_file_location(name, path, submodule_search_locations=None)
    mod = importlib.util.module_from_spec(spec)
    mod.__package__ = module.__package__
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod
