#!/usr/bin/env python3
"""Bring the real NDIF server stack up and down on this machine, every port on 127.0.0.1.

    python scripts/ndif_local.py setup     build the server's own virtualenv (.ndif/venv)
    python scripts/ndif_local.py up        start redis, the object store, Ray + controller, the API
    python scripts/ndif_local.py status    what runs, where (exit 1 if the stack is not up)
    python scripts/ndif_local.py down      stop every process `up` started, by its process group
    python scripts/ndif_local.py env       print the client's settings (NDIF_HOST=..., HF_HOME=...)

What runs (see docs/ndif.md): `redis-server` (Debian package: queue, per-session pub/sub,
result keys); `moto_server` from PyPI as the S3-compatible object store (large results); a Ray
head limited to this machine with one logical GPU (ndif's controller only places models on
nodes that have one) and ndif's controller actor; ndif's FastAPI app under gunicorn, which also
spawns the queue dispatcher. The server runs from its own virtualenv, in which `mars` is not
installed, so code the client ships by value is really tested. Models are loaded by hub id from
the server's Hugging Face cache (`.ndif/hf`, offline); the tests put their models there.

Every process is started in its own session and stopped by killing that process group (a
daemonizing `ray start` is run with `--block` so Ray's processes stay in it). `up --watch-pid
PID` adds a watchdog that runs `down` when PID exits, and `--ttl S` stops the stack after S
seconds in any case, so a crashed test run leaves nothing behind. State (ports, PIDs) is in
`.ndif/run/state.json`; logs of every service in `.ndif/logs/`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HERE = REPO / "scripts" / "ndif"
REQUIREMENTS = HERE / "requirements.txt"
CONSTRAINTS = HERE / "constraints.txt"  # the exact versions (pip freeze of a built server venv)
SHIMS = HERE / "server"
NDIF_VERSION = "0.1.2"
HOST = "127.0.0.1"
SERVICES = ("redis", "objectstore", "ray", "controller", "api")
DEFAULT_HOME = REPO / ".ndif"


class StackError(RuntimeError):
    """A one-line, user-facing failure of the launcher (printed without a traceback)."""


# ============================================================================ paths and state
def home(args=None) -> Path:
    return Path(getattr(args, "home", None) or os.environ.get("MARS_NDIF_HOME") or DEFAULT_HOME).resolve()


def venv_python(h: Path) -> Path:
    return h / "venv" / "bin" / "python"


def state_path(h: Path) -> Path:
    return h / "run" / "state.json"


def read_state(h: Path) -> dict | None:
    p = state_path(h)
    if not p.is_file():
        return None
    return json.loads(p.read_text())


def write_state(h: Path, state: dict) -> None:
    p = state_path(h)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=1))
    os.replace(tmp, p)


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # pragma: no cover - not ours
        return True
    try:  # a zombie child of ours counts as gone
        done, _ = os.waitpid(pid, os.WNOHANG)
        return done == 0
    except ChildProcessError:
        return True


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:  # pragma: no cover
        return True


# ============================================================================ setup
def requirements_hash() -> str:
    h = hashlib.sha256(REQUIREMENTS.read_bytes())
    h.update(CONSTRAINTS.read_bytes())
    h.update(NDIF_VERSION.encode())
    return h.hexdigest()[:16]


def setup(h: Path, *, quiet: bool = False) -> Path:
    """Build (once per requirements content) the server's virtualenv; check redis-server."""
    if shutil.which("redis-server") is None:
        raise StackError("redis-server is not installed: run `make ndif-setup` (installs the Debian "
                         "package redis-server) or `apt-get install redis-server`")
    py, stamp = venv_python(h), h / "venv" / ".mars-ndif-installed"
    want = requirements_hash()
    if py.is_file() and stamp.is_file() and stamp.read_text().strip() == want:
        stamp.write_text(want + "\n")  # fresh mtime for make
        return py
    if read_state(h):
        raise StackError("the local NDIF is running from the virtualenv that needs rebuilding: "
                         "`python scripts/ndif_local.py down` first")
    if (h / "venv").exists():
        shutil.rmtree(h / "venv")
    h.mkdir(parents=True, exist_ok=True)
    def run(cmd: list[str]) -> None:
        r = subprocess.run(cmd, capture_output=quiet, text=True)
        if r.returncode != 0:
            raise StackError(f"`{' '.join(cmd)}` failed (exit {r.returncode}):\n{(r.stdout or '')[-3000:]}"
                             f"{(r.stderr or '')[-3000:]}")

    # the client's Python minor version: bytecode shipped by value only runs on the same one
    run([sys.executable, "-m", "venv", str(h / "venv")])
    pip = [str(py), "-m", "pip", "install", "--disable-pip-version-check"] + (["--quiet"] if quiet else [])
    run(pip + ["--upgrade", "pip"])
    run(pip + ["-r", str(REQUIREMENTS), "-c", str(CONSTRAINTS)])
    # ndif declares Python >=3.12 and pins nothing of what it runs with here
    run(pip + ["--no-deps", "--ignore-requires-python", f"ndif=={NDIF_VERSION}"])
    check = subprocess.run([str(py), "-c", "import mars_core"], capture_output=True)
    if check.returncode == 0:
        raise StackError(f"mars_core is importable in the server's virtualenv {h / 'venv'}; it must not be "
                         "(by-value code shipping would not be tested): remove it and rerun setup")
    stamp.write_text(want + "\n")
    return py


# ============================================================================ up
def _env(h: Path, st: dict) -> dict:
    """The environment every server process gets (ndif reads its settings from it)."""
    p = st["ports"]
    keep = {k: v for k, v in os.environ.items()
            if k in ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "USER", "TERM")}
    env = {
        **keep,
        "PATH": f"{h / 'venv' / 'bin'}:{keep.get('PATH', '/usr/bin:/bin')}",
        "PYTHONPATH": str(SHIMS),
        "PYTHONNOUSERSITE": "1",
        "HF_HOME": str(h / "hf"),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "NDIF_HOME": str(h / "state"),
        "NDIF_REDIS_URL": f"redis://{HOST}:{p['redis']}/0",
        "NDIF_OBJECT_STORE_URL": f"http://{HOST}:{p['objectstore']}",
        "NDIF_OBJECT_STORE_ACCESS_KEY": "local",
        "NDIF_OBJECT_STORE_SECRET_KEY": "local-secret",
        "NDIF_OBJECT_STORE_REGION": "us-east-1",
        "AWS_ACCESS_KEY_ID": "local",
        "AWS_SECRET_ACCESS_KEY": "local-secret",
        "AWS_DEFAULT_REGION": "us-east-1",
        "NDIF_RAY_ADDRESS": f"ray://{HOST}:{p['ray_client']}",
        "NDIF_API_URL": f"http://{HOST}:{p['api']}",
        "NDIF_API_PORT": str(p["api"]),
        "NDIF_MODEL_IMPORT_PATH": "mars_ndif_local.actor.CPUModelActor",
        "NDIF_CONTROLLER_IMPORT_PATH": "mars_ndif_local.controller.ControllerActor",
        "NDIF_DEFAULT_DTYPE": st["dtype"],
        "NDIF_MINIMUM_DEPLOYMENT_TIME_SECONDS": "0",
        "NDIF_POSTGRES_URL": "",
        "NDIF_LOKI_URL": "",
        "NDIF_INFLUX_ENABLED": "0",
        "NDIF_ENVIRONMENT": "mars-local",
        "GRPC_ENABLE_FORK_SUPPORT": "0",
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_DEDUP_LOGS": "0",
        "OMP_NUM_THREADS": str(st["threads"]),
        "MKL_NUM_THREADS": str(st["threads"]),
        "TOKENIZERS_PARALLELISM": "false",
    }
    return env


def _spawn(h: Path, st: dict, name: str, cmd: list[str], env: dict) -> int:
    log = open(h / "logs" / f"{name}.log", "ab")
    try:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, cwd=str(h / "run"))
    except FileNotFoundError as e:
        raise StackError(f"{name}: cannot run {cmd[0]!r} ({e}); run `python scripts/ndif_local.py setup`")
    finally:
        log.close()
    st["pids"][name] = proc.pid
    write_state(h, st)
    return proc.pid


def _log_tail(h: Path, name: str, n: int = 15) -> str:
    p = h / "logs" / f"{name}.log"
    if not p.is_file():
        return ""
    lines = p.read_text(errors="replace").splitlines()[-n:]
    return "\n".join("    " + x for x in lines)


def _wait(h: Path, st: dict, name: str, ready, deadline: float, *, pid_must_live: bool = True) -> None:
    while time.monotonic() < deadline:
        if ready():
            return
        pid = st["pids"].get(name)
        if pid_must_live and pid and not _alive(pid):
            raise StackError(f"{name} exited while starting; its log {h / 'logs' / (name + '.log')} ends:\n"
                             + _log_tail(h, name))
        time.sleep(0.5)
    raise StackError(f"{name} did not become ready in time; its log {h / 'logs' / (name + '.log')} ends:\n"
                     + _log_tail(h, name))


def _tcp_open(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=1):
            return True
    except OSError:
        return False


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status < 500
    except Exception:
        return False


def _controller_ready(py: Path, env: dict, port: int, log: Path) -> bool:
    code = ("import ray,sys\n"
            f"ray.init(address='{HOST}:{port}', namespace='NDIF', logging_level='error')\n"
            "a = ray.get_actor('Controller', namespace='NDIF')\n"
            "ray.get(a.__ray_ready__.remote(), timeout=20)\n")
    r = subprocess.run([str(py), "-c", code], env=env, capture_output=True, timeout=60)
    if r.returncode != 0:
        with open(log, "ab") as f:
            f.write(b"[ndif_local] controller not ready yet: " + r.stderr[-2000:] + b"\n")
    return r.returncode == 0


def up(h: Path, *, timeout: float = 240.0, watch_pid: int | None = None, ttl: float | None = None,
       dtype: str = "float32", threads: int = 1) -> dict:
    """Start the stack (stopping a previous one of this home first); return its state."""
    py = venv_python(h)
    if not py.is_file():
        raise StackError(f"the server's virtualenv {h / 'venv'} does not exist: run "
                         "`python scripts/ndif_local.py setup` (or `make ndif-setup`) first")
    if shutil.which("redis-server") is None:
        raise StackError("redis-server is not installed: run `make ndif-setup` (apt-get install redis-server)")
    if read_state(h):
        down(h)
    for d in ("logs", "run", "hf", "state"):
        (h / d).mkdir(parents=True, exist_ok=True)
    for old in Path("/tmp").glob("mars-ndif-ray-*"):  # an earlier stack's Ray logs
        shutil.rmtree(old, ignore_errors=True)
    ray_tmp = Path(f"/tmp/mars-ndif-ray-{os.getpid()}")  # Ray's socket paths must stay short
    st = {"home": str(h), "started": time.time(), "dtype": dtype, "threads": int(threads), "pids": {},
          "ray_tmp": str(ray_tmp),
          "ports": {k: free_port() for k in ("redis", "objectstore", "ray", "ray_client", "api", "ray_nm",
                                               "ray_om", "ray_metrics", "ray_dashboard", "ray_agent", "ray_rte", "ray_dash_agent")}}
    write_state(h, st)
    env = _env(h, st)
    p = st["ports"]
    deadline = time.monotonic() + timeout
    vbin = h / "venv" / "bin"
    try:
        _spawn(h, st, "redis", ["redis-server", "--bind", HOST, "--port", str(p["redis"]), "--save", "",
                                "--appendonly", "no", "--protected-mode", "yes", "--dir", str(h / "run")], env)
        _spawn(h, st, "objectstore", [str(vbin / "moto_server"), "-H", HOST, "-p", str(p["objectstore"])], env)
        _wait(h, st, "redis", lambda: _tcp_open(p["redis"]), deadline)
        _wait(h, st, "objectstore", lambda: _http_ok(f"http://{HOST}:{p['objectstore']}/"), deadline)
        resources = json.dumps({"head": 10, "cuda_memory_bytes": 16 * 2**30,
                                "cpu_memory_bytes": int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))})
        _spawn(h, st, "ray", [
            str(vbin / "ray"), "start", "--head", "--block", "--disable-usage-stats",
            "--node-ip-address", HOST, "--port", str(p["ray"]), "--ray-client-server-port", str(p["ray_client"]),
            "--node-manager-port", str(p["ray_nm"]), "--object-manager-port", str(p["ray_om"]),
            "--metrics-export-port", str(p["ray_metrics"]), "--dashboard-agent-listen-port", str(p["ray_agent"]),
            "--dashboard-agent-grpc-port", str(p["ray_dash_agent"]), "--runtime-env-agent-port", str(p["ray_rte"]),
            "--include-dashboard", "true", "--dashboard-host", HOST, "--dashboard-port", str(p["ray_dashboard"]), "--num-cpus", "4", "--num-gpus", "1", "--resources", resources,
            "--temp-dir", str(ray_tmp)], env)
        _wait(h, st, "ray", lambda: _tcp_open(p["ray"]) and _tcp_open(p["ray_client"]), deadline)
        cenv = {**env, "RAY_ADDRESS": f"{HOST}:{p['ray']}"}
        r = subprocess.run([str(py), "-m", "ndif.services.ray.deployments.controller.controller"], env=cenv,
                           cwd=str(h / "run"), stdout=open(h / "logs" / "controller.log", "ab"),
                           stderr=subprocess.STDOUT, timeout=max(10.0, deadline - time.monotonic()))
        if r.returncode != 0:
            raise StackError("controller: launching ndif's controller actor failed; its log "
                             f"{h / 'logs' / 'controller.log'} ends:\n" + _log_tail(h, "controller"))
        _wait(h, st, "controller", lambda: _controller_ready(py, cenv, p["ray"], h / "logs" / "controller.log"), deadline, pid_must_live=False)
        _spawn(h, st, "api", [str(vbin / "gunicorn"), "--config", "python:ndif.services.api.gunicorn_conf",
                              "--bind", f"{HOST}:{p['api']}", "--workers", "1",
                              "ndif.services.api.app:app"], env)
        # /status answers 503 until the dispatcher has connected to Ray (redis flag ray:connected)
        _wait(h, st, "api", lambda: _http_ok(f"http://{HOST}:{p['api']}/status"), deadline)
    except BaseException:
        down(h, quiet=True)
        raise
    if watch_pid or ttl:
        _spawn(h, st, "watchdog", [sys.executable, str(Path(__file__).resolve()), "_watch", "--home", str(h),
                                   "--pid", str(watch_pid or 0), "--ttl", str(ttl or 0)],
               {k: v for k, v in os.environ.items() if k != "NDIF_API_KEY"})
    st["url"] = f"http://{HOST}:{p['api']}"
    st["ready"] = time.time()
    write_state(h, st)
    return st


# ============================================================================ down / status
def down(h: Path, *, quiet: bool = False) -> list[str]:
    """Stop every process group `up` recorded (TERM, then KILL); remove the state file."""
    st = read_state(h)
    if not st:
        return []
    stopped = []
    order = ["watchdog", "api", "ray", "objectstore", "redis"]
    pids = st.get("pids", {})
    me = os.getpid()
    for name in order:
        pid = pids.get(name)
        if not pid or pid == me:
            continue
        try:
            os.killpg(pid, signal.SIGTERM)
            stopped.append(name)
        except ProcessLookupError:
            continue
    t = time.monotonic() + 20
    while time.monotonic() < t and any(_group_alive(pids[n]) for n in order if pids.get(n) and pids[n] != me):
        time.sleep(0.3)
    for name in order:
        pid = pids.get(name)
        if pid and pid != me and _group_alive(pid):
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    for name in order:  # reap our own children
        pid = pids.get(name)
        if pid:
            try:
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass
    # Ray's session logs stay in st["ray_tmp"] until the next `up` (they explain a failed start)
    try:
        state_path(h).unlink()
    except FileNotFoundError:
        pass
    if not quiet:
        print("stopped: " + (", ".join(stopped) or "nothing was running"))
    return stopped


def status(h: Path) -> tuple[bool, str]:
    st = read_state(h)
    if not st:
        return False, f"not running (no {state_path(h)})"
    lines, ok = [], True
    for name in SERVICES:
        if name == "controller":
            continue
        pid = st["pids"].get(name)
        alive = bool(pid) and _group_alive(pid)
        ok &= alive
        lines.append(f"{name:12s} {'up' if alive else 'DOWN'} (pid {pid})")
    url = st.get("url")
    answers = bool(url) and _http_ok(url + "/ping")
    ok &= answers
    lines.append(f"api {url}: {'answers' if answers else 'does not answer'}")
    return ok, "\n".join(lines)


def client_env(h: Path) -> dict:
    st = read_state(h)
    if not st or not st.get("url"):
        raise StackError("the local NDIF is not up: run `python scripts/ndif_local.py up`")
    return {"NDIF_HOST": st["url"], "HF_HOME": str(h / "hf")}


def _watch(h: Path, pid: int, ttl: float) -> None:
    t0 = time.monotonic()
    while True:
        time.sleep(1.0)
        if pid and not _alive(pid):
            break
        if ttl and time.monotonic() - t0 > ttl:
            break
        if not read_state(h):
            return
    down(h, quiet=True)


# ============================================================================ CLI
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="ndif_local.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--home", help=f"state folder (default {DEFAULT_HOME.relative_to(REPO)}/, or $MARS_NDIF_HOME)")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sp = sub.add_parser("setup", help="build the server's virtualenv")
    sp.add_argument("--quiet", action="store_true", help="quiet pip")
    u = sub.add_parser("up", help="start the stack")
    u.add_argument("--timeout", type=float, default=240.0, help="seconds to wait for every service (240)")
    u.add_argument("--watch-pid", type=int, help="stop the stack when this process exits")
    u.add_argument("--ttl", type=float, help="stop the stack after this many seconds")
    u.add_argument("--dtype", default="float32", help="the server's default model dtype (float32)")
    u.add_argument("--threads", type=int, default=1, help="torch threads of the model actor (1)")
    sub.add_parser("down", help="stop the stack")
    sub.add_parser("status", help="is it up")
    sub.add_parser("env", help="print the client's environment for this stack")
    w = sub.add_parser("_watch")
    w.add_argument("--pid", type=int, default=0)
    w.add_argument("--ttl", type=float, default=0)
    args = ap.parse_args(argv)
    h = home(args)
    try:
        if args.cmd == "setup":
            print(f"server virtualenv ready: {setup(h, quiet=args.quiet)}")
        elif args.cmd == "up":
            t0 = time.monotonic()
            st = up(h, timeout=args.timeout, watch_pid=args.watch_pid, ttl=args.ttl, dtype=args.dtype,
                    threads=args.threads)
            print(f"local NDIF up in {time.monotonic() - t0:.0f} s at {st['url']} (logs in {h / 'logs'}); "
                  f"client: export NDIF_HOST={st['url']} HF_HOME={h / 'hf'}")
        elif args.cmd == "down":
            down(h)
        elif args.cmd == "status":
            ok, text = status(h)
            print(text)
            return 0 if ok else 1
        elif args.cmd == "env":
            for k, v in client_env(h).items():
                print(f"export {k}={v}")
        elif args.cmd == "_watch":
            _watch(h, args.pid, args.ttl)
    except StackError as e:
        print(f"ndif_local: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("ndif_local: interrupted; the stack was stopped", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
