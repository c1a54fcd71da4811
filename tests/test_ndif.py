"""Against the real NDIF server, run locally (issue 13): every remote path equals its local run.

The stack (`scripts/ndif_local.py`: redis, an S3 store, a Ray head with ndif's controller and a
CPU model actor, ndif's API under gunicorn, all on 127.0.0.1, from a virtualenv without mars)
is started once per test session and stopped at its end; a watchdog stops it if pytest dies.
Models are served by hub-style id from the server's offline Hugging Face cache (`.ndif/hf`):
the session writes a tiny random LLaVA (`mars-test/tiny-llava`) and the trained toy organism
(`mars-test/organism-natural`) there, and the client reads the same cache, so the local
reference and the server load the same files. The server computes in float32
(NDIF_DEFAULT_DTYPE) with one torch thread, as the client does here: results are compared bit
for bit, except where a path documents a tolerance (remote layer sweeps use full forwards where
the local ones reuse the prompt's key/value cache).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from types import SimpleNamespace

import nnsight
import numpy as np
import pytest
import torch
from huggingface_hub import constants as hf_constants
from nnsight.intervention.backends.remote import RemoteBackend, RemoteError
from nnsight.modeling import huggingface as nn_hf
from nnsight.schema.config import CONFIG

import mars_core.remote as mremote
from analysis.cli import main
from mars_core import InputError, RefusalDirections, load_model
from mars_core.benchmarks.fixtures import write_fixture
from mars_core.datasets import load_dataset
from mars_core.organism import load_organism
from mars_core.organism.sets import organism_suite
from mars_core.steering import NoSteer, calibrate_mars, fit_mars, neutral_calibration
from mars_core.testing import build_tiny_uncached, make_image
from ndif_fake import module_without_saves
from remote_steerers import example_steerers, random_calibration

pytestmark = pytest.mark.ndif

REPO = Path(__file__).resolve().parents[1]
TINY = "mars-test/tiny-llava"
ORGANISM = "mars-test/organism-natural"
PROMPTS = ["How do I build a bomb?", "How do I bake a cake?"]


# ============================================================================ the stack
def _launcher():
    spec = importlib.util.spec_from_file_location("ndif_local", REPO / "scripts" / "ndif_local.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _put_in_cache(hub: Path, repo_id: str, model, processor) -> Path:
    """Lay `model` out as the Hugging Face cache does for `repo_id` (refs/main -> a snapshot)."""
    root = hub / ("models--" + repo_id.replace("/", "--"))
    tmp = hub / f".tmp-{uuid.uuid4().hex}"
    model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    digest = hashlib.sha1()
    for p in sorted(tmp.rglob("*")):
        if p.is_file():
            digest.update(p.name.encode() + p.read_bytes())
    rev = digest.hexdigest()
    snap = root / "snapshots" / rev
    if not snap.exists():
        snap.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, snap)
    else:
        import shutil

        shutil.rmtree(tmp)
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text(rev)
    return snap


@pytest.fixture(scope="session")
def ndif_stack():
    nl = _launcher()
    home = nl.home()
    if not nl.venv_python(home).is_file():
        pytest.fail(f"the local NDIF server is not installed ({home / 'venv'} is missing): run `make ndif-setup` "
                    "(what `make test` does first), or deselect these tests with -m 'not ndif'")
    t0 = time.monotonic()
    state = nl.up(home, watch_pid=os.getpid(), ttl=5400)
    hub = home / "hf" / "hub"
    tiny = build_tiny_uncached("llava")  # save_pretrained edits the config: not the shared cached one
    _put_in_cache(hub, TINY, tiny.model, tiny.processor)
    _put_in_cache(hub, ORGANISM, *load_organism("natural"))
    print(f"\nlocal NDIF up in {time.monotonic() - t0:.0f} s at {state['url']}")
    try:
        yield SimpleNamespace(url=state["url"], home=home, hub=hub, state=state, launcher=nl)
    finally:
        nl.down(home, quiet=True)


@pytest.fixture(scope="module")
def client(ndif_stack):
    """This process as an NDIF client of the local stack: its URL, a fresh key, the shared cache."""
    key = "ndif-test-key-" + uuid.uuid4().hex
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(hf_constants, "HF_HUB_CACHE", str(ndif_stack.hub))
        mp.setattr(hf_constants, "HF_HUB_OFFLINE", True)
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setattr(CONFIG.API, "HOST", ndif_stack.url)
        mp.setattr(CONFIG.API, "APIKEY", None)
        mp.setenv("NDIF_API_KEY", key)
        # nnsight asks the Hub for a repo's canonical id; offline, the tests give it
        for repo in (TINY, ORGANISM):
            mp.setitem(nn_hf._ID_CACHE, repo, repo)
        torch.set_num_threads(1)  # the server's model actor runs one thread (ndif_local.py --threads)
        try:
            yield SimpleNamespace(key=key, **vars(ndif_stack))
        finally:
            torch.set_num_threads(threads)


class _Requests:
    """Counts the requests nnsight sends to NDIF (RemoteBackend calls)."""

    def __init__(self, mp):
        self.n = 0
        orig = RemoteBackend.__call__

        def counted(backend, *a, **k):
            self.n += 1
            return orig(backend, *a, **k)

        mp.setattr(RemoteBackend, "__call__", counted)


@pytest.fixture
def requests_sent(monkeypatch):
    return _Requests(monkeypatch)


@pytest.fixture(scope="module")
def tiny(client):
    local = load_model(TINY)
    remote = load_model(TINY, remote=True)
    assert remote.hf is None and mremote.remote_default(remote) is True
    yield local, remote
    mremote.use_remote(remote, False)


@pytest.fixture(scope="module")
def organism(client):
    local = load_model(ORGANISM)
    remote = load_model(ORGANISM, remote=True)
    yield local, remote
    mremote.use_remote(remote, False)


# ============================================================================ remote == local
@pytest.mark.parametrize("name", ["mars", "actadd", "ablation", "autosteer", "none"])
def test_first_token_steering_equals_local(tiny, name, requests_sent):
    local, remote = tiny
    images = [make_image(0), make_image(1)]
    st = example_steerers(local, random_calibration(local))[name]
    got, rec = st.last_logits(remote, remote.build_batch(PROMPTS, images=images))
    ref, ref_rec = st.last_logits(local, local.build_batch(PROMPTS, images=images))
    assert requests_sent.n == 1
    assert torch.equal(got, ref)
    assert rec.keys() == ref_rec.keys()
    for k, v in ref_rec.items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(rec[k], v), k
    if name != "none":
        assert not torch.equal(got, NoSteer().last_logits(local, local.build_batch(PROMPTS, images=images))[0])


@pytest.mark.parametrize("name", ["mars", "mars_every_token", "actadd", "autosteer"])
def test_steered_generation_equals_local(tiny, name):
    local, remote = tiny
    images = [make_image(2), make_image(3)]
    st = example_steerers(local, random_calibration(local))[name]
    got = st.generate(remote, PROMPTS, images=images, max_new_tokens=4)
    ref = st.generate(local, PROMPTS, images=images, max_new_tokens=4)
    assert torch.equal(got.token_ids, ref.token_ids) and list(got) == list(ref)
    assert torch.equal(got.alpha, ref.alpha)


def test_capture_directions_and_calibration_equal_local(tiny, requests_sent):
    """Activation capture in sessions (several batches per request), the difference-of-means
    directions and the neutral-input calibration, each equal to the local run."""
    local, remote = tiny
    harmful = [f"How do I build weapon number {i}?" for i in range(6)]
    harmless = [f"How do I bake cake number {i}?" for i in range(6)]
    got = RefusalDirections.extract(remote, harmful, harmless, batch_size=2, progress=False)
    sent = requests_sent.n
    ref = RefusalDirections.extract(local, harmful, harmless, batch_size=2, progress=False)
    assert 2 <= sent < 6  # 3 batches a side, batched into one session request per side
    for a, b in ((got.harmful_mean, ref.harmful_mean), (got.harmless_mean, ref.harmless_mean),
                 (got.mean_diff, ref.mean_diff)):
        assert torch.equal(a, b)
    cal = calibrate_mars(remote, got, n_neutral=4, batch_size=2)
    cal_ref = calibrate_mars(local, ref, n_neutral=4, batch_size=2)
    assert torch.equal(cal.direction, cal_ref.direction)
    assert torch.equal(cal.offsets["image"], cal_ref.offsets["image"])


def test_fitting_sweeps_equal_local(organism):
    """`fit_mars` (layer selection over every layer, then the gate grid) on the trained organism
    served by NDIF: the same layer and gate as locally, selection scores within the documented
    full-forward vs cached-prefix tolerance."""
    local, remote = organism
    s = organism_suite(3)
    sub = lambda n, k: s[n].subset(range(0, len(s[n]), max(1, len(s[n]) // k)))  # noqa: E731
    dirs = RefusalDirections.extract(local, s["harmful_text_train"].texts[:16], s["harmless_text_train"].texts[:16],
                                     batch_size=16, progress=False)
    calib = neutral_calibration(local, dirs, sub("neutral_text", 8), {"image": sub("neutral_image", 8)}, batch_size=16)
    safe = {n: sub(n, 8) for n in ("harmless_text_train", "harmless_image_cal")}
    kw = dict(neutral={"image": sub("neutral_image", 8)}, batch_size=16, gains=(2.0, 4.0), margins=(0.0, 0.5),
              taus=(0.0, 0.5, 1.0))
    got = fit_mars(remote, calib, sub("harmful_text_train", 8), safe, **kw)
    ref = fit_mars(local, calib, sub("harmful_text_train", 8), safe, **kw)
    assert got.config == ref.config and got.fit_info == ref.fit_info
    for a, b in ((got.selection, ref.selection), (got.gate_selection, ref.gate_selection)):
        assert set(a.data_vars) == set(b.data_vars)
        for v in a.data_vars:
            if np.issubdtype(a[v].dtype, np.floating):
                np.testing.assert_allclose(a[v].values, b[v].values, rtol=0, atol=1e-4, err_msg=v)
            else:
                np.testing.assert_array_equal(a[v].values, b[v].values, err_msg=v)


def _datasets_equal(a_dir: Path, b_dir: Path, atol: float) -> list[str]:
    names = sorted(p.name for p in a_dir.glob("*.nc"))
    assert names == sorted(p.name for p in b_dir.glob("*.nc")) and names
    for name in names:
        a, b = load_dataset(a_dir / name), load_dataset(b_dir / name)
        assert set(a.data_vars) == set(b.data_vars), name
        for v in a.data_vars:
            x, y = a[v].values, b[v].values
            if np.issubdtype(x.dtype, np.floating):
                np.testing.assert_allclose(x, y, rtol=0, atol=atol, equal_nan=True, err_msg=f"{name}:{v}")
            else:
                np.testing.assert_array_equal(x, y, err_msg=f"{name}:{v}")
    return names


def test_evaluate_shard_equals_local(tiny, tmp_path):
    bench = write_fixture("figstep", tmp_path / "bench", n=4, seed=0)
    args = ["evaluate", "--quick", "--no-progress", "--model", TINY, "-b", f"figstep={bench}",
            "--methods", "none,actadd,mars", "--chunk-size", "2"]
    assert main([*args, "--remote", "--out", str(tmp_path / "remote")]) == 0
    assert main([*args, "--out", str(tmp_path / "local")]) == 0
    _datasets_equal(tmp_path / "remote" / "data", tmp_path / "local" / "data", atol=1e-4)


@pytest.mark.slow
def test_reproduce_remote_equals_local(tiny, tmp_path):
    """`mars reproduce --remote` on a hub-style id served by the local NDIF writes the same data
    as the local run (layer sweeps: full forwards remotely, hence the tolerance)."""
    base = ["reproduce", "--quick", "--quiet", "--model", TINY]
    assert main([*base, "--remote", "--out", str(tmp_path / "remote")]) == 0
    assert main([*base, "--out", str(tmp_path / "local")]) == 0
    names = _datasets_equal(tmp_path / "remote" / "data", tmp_path / "local" / "data", atol=1e-4)
    assert "comparison.nc" in names
    assert (tmp_path / "remote" / "data" / "mars" / "mars.json").is_file()


# ============================================================================ faults
def test_a_value_not_saved_does_not_come_back(tiny):
    """The server returns only values marked with nnsight.save: reading an unsaved one after the
    block fails (UnboundLocalError), and the CLI's explanation says what was missing."""
    _, remote = tiny
    batch = remote.build_batch(PROMPTS[:1])
    with pytest.raises(UnboundLocalError) as e:
        with remote.nn.trace(batch.inputs):
            unsaved = remote.logits_envoy.output[:, -1]
        unsaved.shape  # noqa: B018
    assert "nnsight.save" in mremote.remote_failure(e.value)
    with remote.nn.trace(batch.inputs):
        saved = nnsight.save(remote.logits_envoy.output[:, -1])
    assert saved.shape == (1, remote.nn.config.text_config.vocab_size)


def test_package_code_with_a_save_deleted_fails_on_the_server(tiny, tmp_path):
    """Deleting the `.save()` in the package's last-logits trace breaks it on the real server
    (the fake in tests/test_remote.py returns saved values only too)."""
    from mars_core import scoring

    _, remote = tiny
    batch = remote.build_batch(PROMPTS)
    assert scoring.last_logits(remote, batch).shape[0] == 2
    broken = module_without_saves(scoring, tmp_path)
    try:
        with pytest.raises((UnboundLocalError, NameError)):
            broken.last_logits(remote, batch)
    finally:
        sys.modules.pop(broken.__name__, None)


def test_exception_in_a_remote_block_shows_the_users_line(tiny):
    _, remote = tiny
    batch = remote.build_batch(PROMPTS[:1])
    with pytest.raises(RemoteError) as e:
        with remote.nn.trace(batch.inputs):
            h = remote.logits_envoy.output[:, -1]
            bad = h @ torch.zeros(3, 3)  # the user's line the server's traceback ends at
            nnsight.save(bad)
    text = str(e.value)
    assert "bad = h @ torch.zeros(3, 3)" in text and "cannot be multiplied" in text
    msg = mremote.remote_failure(e.value)
    assert msg.startswith(f"the NDIF server at {CONFIG.API.HOST} reported: RuntimeError: mat1 and mat2 shapes")
    assert "test_ndif.py" in msg and "\n" not in msg


def test_unreachable_server_is_one_clear_error(client, capsys, monkeypatch):
    nl = client.launcher
    dead = f"http://127.0.0.1:{nl.free_port()}"
    with pytest.raises(InputError, match=re.escape(f"the NDIF server at {dead} cannot be reached")):
        load_model(TINY, remote=dead)
    monkeypatch.setattr(CONFIG.API, "HOST", dead)
    rc = main(["extract", "--model", TINY, "--remote", "--out", "unused.safetensors"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "cannot be reached" in err and "Traceback" not in err


def test_model_the_server_cannot_deploy(client, capsys):
    """A hub id the server does not have: the server's 'Could not deploy' comes back as one line
    naming the server (the client still has the config it needs to build the request)."""
    mm = load_model(TINY, remote=True)
    try:
        nn_hf._ID_CACHE["mars-test/not-on-the-server"] = "mars-test/not-on-the-server"
        mm.nn.repo_id = "mars-test/not-on-the-server"
        with pytest.raises(RemoteError) as e:
            with mm.nn.trace(mm.build_batch(PROMPTS[:1]).inputs):
                nnsight.save(mm.logits_envoy.output)
    finally:
        nn_hf._ID_CACHE.pop("mars-test/not-on-the-server", None)
        mremote.use_remote(mm, False)
    msg = mremote.remote_failure(e.value)
    assert str(e.value).startswith("Could not deploy this model")
    # the loader's sentence, not the end of the server's traceback (ndif cuts the reason at 1,500
    # characters, so where the traceback ends depends on where the server is installed)
    assert msg.endswith("could not deploy the model: We couldn't connect to "
                        "'https://huggingface.co' to load the files, and couldn't find them in the cached files."), msg
    assert CONFIG.API.HOST in msg and "\n" not in msg


def _bucket_keys(client) -> list[str]:
    port = client.state["ports"]["objectstore"]
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/ndif-results?list-type=2", timeout=10) as r:
            return re.findall(r"<Key>([^<]+)</Key>", r.read().decode())
    except urllib.error.HTTPError as e:
        if e.code == 404:  # the bucket is created with the first staged result
            return []
        raise


def test_large_result_comes_through_the_object_store(client, tiny):
    """A 12 MB result is over the inline limit (the Redis pub/sub buffer): the server stages it in
    the S3 store and the client downloads it from the presigned URL; the values equal local ones."""
    local, remote = tiny

    def run(mm):
        batch = mm.build_batch(PROMPTS[:1])
        with mm.nn.trace(batch.inputs):
            g = torch.Generator().manual_seed(0)
            big = nnsight.save(torch.randn(3_000_000, generator=g) * mm.logits_envoy.output[0, -1, 0])
        return big

    before = set(_bucket_keys(client))
    got = run(remote)
    new = set(_bucket_keys(client)) - before
    assert len(new) == 1 and new.pop().endswith(".pt")
    assert got.numel() * 4 > 8 * 2**20
    assert torch.equal(got, run(local))


HEAVY_BLOCK = """
with mm.nn.trace(batch.inputs):
    x = torch.ones(1000, 1000) / 1000
    for _ in range(400):  # seconds of work on the server
        x = x @ x
    y = nnsight.save(x.sum() + mm.logits_envoy.output[0, -1, 0])
"""

CLIENT_SCRIPT = r'''
import os, sys, torch, nnsight
from huggingface_hub import constants
constants.HF_HUB_CACHE = sys.argv[1]; constants.HF_HUB_OFFLINE = True
from nnsight.modeling import huggingface as nn_hf
from nnsight.schema.config import CONFIG
CONFIG.API.HOST = sys.argv[2]
nn_hf._ID_CACHE[sys.argv[3]] = sys.argv[3]
torch.set_num_threads(1)
from mars_core import load_model
mm = load_model(sys.argv[3], remote=True)
batch = mm.build_batch(["How do I bake a cake?"])
print("SUBMITTING", flush=True)
''' + HEAVY_BLOCK + r'''
print("RESULT", repr(float(y)), flush=True)
'''


def test_interrupted_request_then_resubmitted(client, tiny, tmp_path):
    """A client interrupted (Ctrl-C) while its request runs on the server; the same request
    resubmitted by a fresh client completes with the local result; the server stays healthy."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "NDIF_API_KEY": client.key, "OMP_NUM_THREADS": "1"}
    (tmp_path / "client.py").write_text(CLIENT_SCRIPT)
    cmd = [sys.executable, str(tmp_path / "client.py"), str(client.hub), client.url, TINY]

    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True, cwd=tmp_path)
    try:
        seen = ""
        while "RUNNING" not in seen:  # nnsight's status line: the server has started the block
            c = proc.stdout.read(1)
            assert c, seen[-2000:]
            seen += c
        time.sleep(1.0)
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=120)
        out = seen + out
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "RESULT" not in out and "KeyboardInterrupt" in out, out[-2000:]

    again = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    got = float(re.search(r"RESULT (\S+)", again.stdout).group(1))
    local, _ = tiny
    ns = {"mm": local, "batch": local.build_batch(["How do I bake a cake?"]), "torch": torch, "nnsight": nnsight}
    src = tmp_path / "heavy_local.py"
    src.write_text(HEAVY_BLOCK)
    exec(compile(HEAVY_BLOCK, str(src), "exec"), ns)
    assert got == float(ns["y"])
    ok, text = client.launcher.status(client.home)
    assert ok, text


# ============================================================================ the stack itself
def _stack_pids(state: dict) -> set[int]:
    groups = {pid for pid in state["pids"].values() if pid}
    pids = set()
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if os.getpgid(int(d.name)) in groups:
                    pids.add(int(d.name))
            except (ProcessLookupError, PermissionError):
                continue
    return pids


def _sockets(pids: set[int]) -> list[tuple[int, str, str, str, str]]:
    """(pid, table, local, remote, state) of every inet socket the processes hold (/proc/net)."""
    inodes: dict[str, int] = {}
    for pid in pids:
        try:
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    inodes[target[8:-1]] = pid
        except (FileNotFoundError, PermissionError, ProcessLookupError):
            continue
    found = []
    for table in ("tcp", "tcp6", "udp", "udp6"):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            f = line.split()
            if f[9] in inodes:
                found.append((inodes[f[9]], table, f[1], f[2], f[3]))
    return found


LOOPBACK = ("0100007F:", "0000000000000000FFFF00000100007F:", "00000000000000000000000001000000:")
UNCONNECTED = ("00000000:0000", "00000000000000000000000000000000:0000")


def test_the_stack_listens_and_talks_on_loopback_only(client, tiny):
    """Every socket the server's processes listen on is bound to 127.0.0.1 (or ::1), and every
    connection they hold goes to a loopback address: nothing is served or sent elsewhere."""
    NoSteer().last_logits(tiny[1], tiny[1].build_batch(PROMPTS))  # the stack has served a request
    socks = _sockets(_stack_pids(client.state))
    listening = [s for s in socks if s[4] == "0A" and s[1].startswith("tcp")]
    assert len(listening) >= 5  # redis, the S3 store, the API, Ray's GCS and raylet at least
    bad_listen = [s for s in socks if (s[4] == "0A" or s[1].startswith("udp")) and not s[2].startswith(LOOPBACK)]
    assert bad_listen == [], bad_listen
    bad_peer = [s for s in socks if s[4] != "0A" and s[3] not in UNCONNECTED and not s[3].startswith(LOOPBACK)]
    assert bad_peer == [], bad_peer


def test_api_key_never_reaches_the_servers_disk_or_logs(client, tiny):
    """After every request above (sent with this module's key), the key is nowhere in the
    server's logs, state, Ray session folder or HF cache; the client wrote no nnsight config."""
    _, remote = tiny
    NoSteer().last_logits(remote, remote.build_batch(PROMPTS))  # at least one request with this key
    needle = client.key.encode()
    roots = [client.home / d for d in ("logs", "run", "state", "hf")] + [Path(client.state["ray_tmp"])]
    hits = []
    for root in roots:
        for p in root.rglob("*") if root.exists() else ():
            if p.is_file() and not p.is_symlink():
                try:
                    if needle in p.read_bytes():
                        hits.append(str(p))
                except OSError:
                    pass
    assert hits == []
    assert any((client.home / "logs").iterdir())  # there were logs to search
