"""The server process of the fake NDIF (see `ndif_fake.py`, which starts it).

Run as `python -I ndif_fake_server.py MODEL_DIR --block mars_core ...`: isolated mode, so
neither this directory nor the working directory is on sys.path, and a meta-path finder makes
every import of a blocked package fail (also through an editable install). It imports nothing
from the repository; the code a request needs must arrive in the request.

Wire protocol with the client (one pipe each way), frames of `kind (1 byte) + length (8
bytes, big-endian) + payload`, kind b"T" (UTF-8 text, JSON) or b"B" (bytes):

    client -> server                          server -> client
    T {"op": "subscribe"}                     T {"session_id": ...}      (the websocket's first message)
    T {"op": "request", "request": <RequestModel.metadata()>, "threads": n}
    B <payload of RequestModel.serialize>     T RECEIVED                 (the HTTP reply to the POST)
                                              T RUNNING, T LOG ...       (websocket frames)
                                              B COMPLETED (ResponseModel.pickle(), data = result bytes)
                                              or T ERROR
    T {"op": "exit"}

Frames go out on a duplicate of the original stdout; file descriptor 1 itself is pointed at
stderr, so nothing a library prints can corrupt the stream.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import importlib
import importlib.abc
import io
import json
import linecache
import os
import pickle
import struct
import sys
import threading
import time
import traceback
import types
import uuid
from concurrent.futures import ThreadPoolExecutor

_HEADER = struct.Struct(">cQ")


# ---------------------------------------------------------------------------- framing
def read_frame(stream):
    head = stream.read(_HEADER.size)
    if len(head) < _HEADER.size:
        return None
    kind, n = _HEADER.unpack(head)
    payload = stream.read(n)
    if len(payload) < n:
        return None
    return payload.decode() if kind == b"T" else payload


def write_frame(stream, payload, lock=None):
    data = payload.encode() if isinstance(payload, str) else bytes(payload)
    kind = b"T" if isinstance(payload, str) else b"B"
    with lock or contextlib.nullcontext():
        stream.write(_HEADER.pack(kind, len(data)) + data)
        stream.flush()


# ---------------------------------------------------------------------------- the server
class _Blocked(importlib.abc.MetaPathFinder):
    """The server does not have these packages: refuse every import of them."""

    def __init__(self, names):
        self.names = tuple(names)

    def find_spec(self, name, path=None, target=None):
        if any(name == b or name.startswith(b + ".") for b in self.names):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


class _Rejected(Exception):
    """A request refused before any of its code runs (the server answers with a sentence,
    no traceback)."""


def _result_pickle_module():
    """A pickle-module stand-in for `torch.save(saved, f, pickle_module=...)`, behaving like
    the one the NDIF server uses for results: tensors on an accelerator are saved as CPU
    tensors; a class that arrived by value with the request goes back as a reference to the
    client's own class (import path and name, not verified here where its module cannot be
    imported); classes and functions born in the block (nothing to import anywhere) go by
    value (cloudpickle). Unlike the server, a by-value class the client cannot resolve by
    name has no by-value fallback here. The stream needs only stdlib, torch and cloudpickle
    to load."""
    import cloudpickle
    import torch

    try:
        from cloudpickle.cloudpickle import _DYNAMIC_CLASS_TRACKER_BY_CLASS as arrived
    except ImportError:  # pragma: no cover - cloudpickle internals moved
        arrived = {}

    def importable(obj) -> bool:
        try:
            target = importlib.import_module(obj.__module__)
            for part in obj.__qualname__.split("."):
                target = getattr(target, part)
        except Exception:
            return False
        return target is obj

    class ResultPickler(pickle.Pickler):
        def reducer_override(self, obj):
            if torch.is_tensor(obj) and obj.device.type != "cpu":
                return obj.detach().cpu().__reduce_ex__(pickle.HIGHEST_PROTOCOL)
            if isinstance(obj, types.ModuleType):
                return importlib.import_module, (obj.__name__,)
            if isinstance(obj, type):
                if obj in arrived and str(getattr(obj, "__qualname__", "")).isidentifier():
                    return getattr, (types.ModuleType(obj.__module__), obj.__qualname__)
                if not importable(obj):
                    return pickle.loads, (cloudpickle.dumps(obj),)
                return NotImplemented
            if isinstance(obj, types.FunctionType) and not importable(obj):
                return pickle.loads, (cloudpickle.dumps(obj),)
            return NotImplemented

    module = types.ModuleType("result_pickle")
    module.__dict__.update({k: v for k, v in pickle.__dict__.items() if not k.startswith("__")})
    module.Pickler = ResultPickler
    return module


@contextlib.contextmanager
def _request_scope():
    """What the server does around each request: the block's source registered in
    linecache and nnsight's memoized SOURCES/BLOCKS are restored afterwards, so nothing one
    request registers leaks into the next on this long-lived process."""
    from nnsight.tracing.globals import BLOCKS, SOURCES

    snapshot = dict(linecache.cache), dict(SOURCES), dict(BLOCKS)
    try:
        yield
    finally:
        for live, old in zip((linecache.cache, SOURCES, BLOCKS), snapshot):
            live.clear()
            live.update(old)


class _LogStream(io.TextIOBase):
    """stdout/stderr while a block runs: every complete line goes back as a LOG response."""

    def __init__(self, emit):
        self.emit, self.buf = emit, ""

    def writable(self):
        return True

    def write(self, text):
        self.buf += text
        while "\n" in self.buf:
            line, self.buf = self.buf.split("\n", 1)
            self.emit(line)
        return len(text)

    def flush(self):
        if self.buf:
            self.emit(self.buf)
            self.buf = ""


class Server:
    def __init__(self, args, out):
        import torch
        import transformers
        import nnsight

        self.out, self.lock = out, threading.Lock()
        self.blocked = tuple(args.block)
        auto = getattr(transformers, args.auto_class)
        model = auto.from_pretrained(args.model_dir).eval()
        model.requires_grad_(False)  # the server's models are inference-only; grad mode stays on
        kwargs = {}
        if args.processor:
            proc = transformers.AutoProcessor.from_pretrained(args.model_dir)
            kwargs = dict(processor=proc, tokenizer=getattr(proc, "tokenizer", proc))
        if args.task:
            kwargs["task"] = args.task
        self.model = nnsight.TransformersModel(model, **kwargs)
        self.pickle_module = _result_pickle_module()
        self.pool = ThreadPoolExecutor(max_workers=1)  # requests run on a worker thread, as on the server
        self.torch = torch

    # -- the responses ------------------------------------------------------------------
    def send(self, response, binary=False):
        write_frame(self.out, response.pickle() if binary else response.model_dump_json(), self.lock)

    def respond(self, rid, status, description="", **kw):
        from nnsight.schema.response import ResponseModel

        self.send(ResponseModel(id=rid, status=status, description=description, **kw),
                  binary=kw.get("data") is not None)

    def blocked_loaded(self):
        return sorted(m for m, mod in list(sys.modules.items())
                      if mod is not None and any(m == b or m.startswith(b + ".") for b in self.blocked))

    # -- one request --------------------------------------------------------------------
    def execute(self, request, blob):
        """Worker-thread body: rebuild the tracer against this process's model, run the
        block inside a trace scope and collect the values it marked saved, by identity,
        from the block's frame (every other local stays here); torch.save them."""
        from nnsight.intervention.serialization import UnknownPersistentIdError
        from nnsight.schema.request import RequestModel
        from nnsight.tracing.tracer import _saves, dec, inc

        try:
            tracer = RequestModel.deserialize(blob, self.model._remoteable_persistent_objects(),
                                              compress=request.compress)
        except UnknownPersistentIdError as e:
            raise _Rejected(f"the model on this server has a different module tree than the one the "
                            f"block was traced against ({e})") from e
        except Exception as e:
            raise _Rejected(f"the request payload could not be read ({type(e).__name__}: {e})") from e
        inc()  # the client's Tracer.__exit__ does the same around its backend call
        try:
            tracer.execute(tracer.info.code)
            saves = _saves()
            saved = {k: v for k, v in tracer.info.frame.f_locals.items() if id(v) in saves}
        finally:
            dec()
        buf = io.BytesIO()
        self.torch.save(saved, buf, pickle_module=self.pickle_module)
        return saved, buf.getvalue()

    def error_text(self, e):
        from nnsight.tracing.util import clean_traceback, filter_traceback

        if isinstance(e, _Rejected):
            return f"Your request was rejected: {e}"
        pool = os.path.dirname(concurrent.futures.__file__)  # the worker thread's plumbing
        tb = filter_traceback(clean_traceback(e.__traceback__),
                              lambda f: f.f_code.co_filename != __file__ and not f.f_code.co_filename.startswith(pool))
        return "".join(traceback.format_exception(type(e), e, tb))

    def handle(self, header, blob):
        from nnsight.schema.request import RequestModel
        from nnsight.schema.response import Status

        request = RequestModel.model_validate_json(header["request"])
        rid = uuid.uuid4().hex
        self.respond(rid, Status.RECEIVED, "Your job has been received and is waiting to be queued.")
        if not request.session_id:
            self.respond(rid, Status.ERROR, "the fake NDIF answers blocking requests only (no object store)")
            return
        self.respond(rid, Status.QUEUED, "Your job has been queued.")
        # the client's torch thread count: CPU kernels reduce in a thread-dependent order and
        # the tests compare server results with local ones bit for bit
        self.torch.set_num_threads(int(header.get("threads") or self.torch.get_num_threads()))
        t0 = time.time()
        self.respond(rid, Status.RUNNING, "Your job has started running.")
        log = lambda line: self.respond(rid, Status.LOG, line)  # noqa: E731
        out, err = _LogStream(log), _LogStream(log)
        try:
            with _request_scope():
                try:
                    self.model._remoteable_set_env(request.env)
                    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                        try:
                            saved, data = self.pool.submit(self.execute, request, blob).result()
                        finally:
                            out.flush()
                            err.flush()
                finally:
                    self.model.interleaver.cancel()
        except Exception as e:
            meta = {"exec_ms": round((time.time() - t0) * 1000, 2), "blocked_loaded": self.blocked_loaded()}
            self.respond(rid, Status.ERROR, self.error_text(e), meta=meta)
            return
        if request.compress:
            import zstandard

            data = zstandard.ZstdCompressor(level=3).compress(data)
        meta = {"exec_ms": round((time.time() - t0) * 1000, 2), "saved": sorted(saved), "model_key": request.model_key,
                "blocked_loaded": self.blocked_loaded(), "result_bytes": len(data)}
        self.respond(rid, Status.COMPLETED, "Your job has been completed.", data=data, meta=meta)


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("model_dir")
    p.add_argument("--block", action="append", default=[])
    p.add_argument("--auto-class", default="AutoModelForImageTextToText")
    p.add_argument("--task", default="image-text-to-text")
    p.add_argument("--processor", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args(argv)
    sys.meta_path.insert(0, _Blocked(args.block))
    # and absent to probes: importlib.util.find_spec (how transformers checks optional packages)
    # answers None for a name that is None in sys.modules, as for a package not installed
    for name in args.block:
        sys.modules[name] = None
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    stdin = sys.stdin.buffer

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    importable = {}
    for name in args.block:
        try:
            importlib.import_module(name)
            importable[name] = True
        except ModuleNotFoundError:
            importable[name] = False
    server = Server(args, out)
    write_frame(out, json.dumps({"ready": True, "importable": importable,
                                 "blocked_loaded": server.blocked_loaded()}))
    while True:
        frame = read_frame(stdin)
        if frame is None:
            break
        header = json.loads(frame)
        if header["op"] == "exit":
            break
        if header["op"] == "subscribe":
            write_frame(out, json.dumps({"session_id": uuid.uuid4().hex}), server.lock)
        elif header["op"] == "request":
            server.handle(header, read_frame(stdin))
    server.pool.shutdown()


if __name__ == "__main__":
    main()
