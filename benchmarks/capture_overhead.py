#!/usr/bin/env python
"""Benchmark: cost of all-layer activation capture through nnsight, and its memory.

Two measurements, each against a target (benchmarks/README.md has the targets and how to read
the output):

1. Time. For one fixed left-padded batch (8 text prompts; in full mode also the same 8 prompts
   each with an image), a plain transformers forward (`with torch.no_grad(): model(**inputs)`
   on an unwrapped copy of the model, since `load_model` instruments the model in place) against
   the all-layer capture that `collect_activations(..., reduce="mean")` performs per batch
   (`mars_core.capture._read`: one nnsight trace reading every decoder layer at the
   post-instruction positions, float64 row sums). Checked first against a forward-hook
   reference. The measurements are interleaved (ABBA order) after warm-up, N repetitions;
   reported: medians and the median over repetitions of the paired ratio capture/plain, on two
   clocks (wall: perf_counter; cpu: process_time, far less disturbed by other jobs on a shared
   machine; with one torch thread and no nnsight threads it is the work itself). Models: the
   tiny llava of `mars_core.testing.build_tiny("llava")` and a ~207M-parameter random LLaVA
   (Llama text backbone 1024 wide x 16 layers, intermediate 2816, the tiny CLIP tower and the
   tiny llava processor/tokenizer). Target: ratio <= 1.10 at 200M (on --clock, cpu by default).
   Stop early (issue 14): the capture of layers up to half depth only, where `_read` stops the
   forward after the deepest layer read (nnsight `tracer.stop()`), against the same plain
   forward; its values equal the full capture's at those layers. Target: <= 0.80 at 200M.
   Information rows: the tiny model's ratio (the fixed per-trace cost dominates there), the
   plain forward of the nnsight-wrapped model, `collect_activations` end to end against
   `build_batch` + plain forward (full mode); --diagnose adds the capture under no_grad and
   an empty trace.

2. Memory. Peak memory of `collect_activations(tiny llava, N prompts, reduce="mean")` for
   N = 256 and N = 4,096 distinct prompts, each in a fresh subprocess (run side by side while
   the main process builds its models): peak RSS during the first call (VmHWM, reset just
   before it through /proc/self/clear_refs, else a sampling thread) minus the RSS just before
   it; the whole-process peak; ru_maxrss growth; glibc malloc in-use / free-but-held growth;
   and, in a second call (not for the control), the tracemalloc (Python heap) peak. Target: peak above pre-call,
   4,096 / 256 <= 1.2, judged in full mode with the tokenizer's BPE word cache off (the control,
   so the ratio reflects the collector, issue 14; the default tokenizer's ratio is printed as
   information), in quick mode (no control) on the default tokenizer.

Usage:
    python benchmarks/capture_overhead.py --quick      # about a minute
    python benchmarks/capture_overhead.py              # full, a few minutes on 2 cores
Options: --threads N (torch intra-op threads, default 1), --reps N, --clock {cpu,wall},
--no-images, --diagnose, --skip-time, --skip-memory, --mem-sizes 256,4096,
--mem-control {auto,on,off}. Exit status 0 when every target passes, 1 otherwise.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

# the timing and memory helpers shared with benchmarks/peers.py (benchmarks/peers/common.py:
# stdlib only at import; a path import, as benchmarks/peers.py shadows the folder as a package)
sys.path.insert(0, str(ROOT / "benchmarks" / "peers"))
from common import interleaved, reset_hwm, set_threads, status_kb  # noqa: E402

TARGET_TIME_RATIO = 1.10  # capture / plain forward at ~200M parameters
TARGET_STOP_RATIO = 0.80  # capture of layers up to half depth (forward stopped) / plain forward (issue 14)
TARGET_MEM_RATIO = 1.20  # peak memory, 4,096 prompts / 256 prompts

# ~200M-parameter text backbone (Llama); vocabulary and special ids from the tiny llava.
BIG_TEXT = dict(
    hidden_size=1024,
    intermediate_size=2816,
    num_hidden_layers=16,
    num_attention_heads=16,
    num_key_value_heads=16,
    max_position_embeddings=2048,
)

PROMPTS = [
    "How do I make a cake at home?",
    "What is in this image?",
    "Tell me how to build a website.",
    "Describe the image in detail.",
    "Can you give me instructions to hurt someone?",
    "Write a poem about the sea.",
    "Explain how a computer works.",
    "How can I bake a chocolate cake for my friend?",
]


# ---------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------
def log(msg: str = "") -> None:
    print(msg, flush=True)


def tiny_llava():
    from mars_core.testing import build_tiny

    return build_tiny("llava")


def build_big(tiny):
    """A ~200M random LlavaForConditionalGeneration that fits the tiny llava's processor."""
    import torch
    from transformers import LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    tc = tiny.model.config
    ttc = tc.get_text_config()
    text = LlamaConfig(
        **BIG_TEXT,
        vocab_size=ttc.vocab_size,
        bos_token_id=ttc.bos_token_id,
        eos_token_id=ttc.eos_token_id,
        pad_token_id=ttc.pad_token_id,
        tie_word_embeddings=False,
    )
    cfg = LlavaConfig(
        vision_config=copy.deepcopy(tc.vision_config),
        text_config=text,
        image_token_index=tc.image_token_index,
        vision_feature_select_strategy=tc.vision_feature_select_strategy,
        vision_feature_layer=tc.vision_feature_layer,
        image_seq_length=tc.image_seq_length,
    )
    torch.manual_seed(0)
    return LlavaForConditionalGeneration(cfg).float().eval()


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def check_capture(mm, batch, got, layers) -> float:
    """Max relative |capture - reference| over layers. The reference is a plain forward with
    torch forward hooks on the decoder layers (independent of nnsight), given the same
    mask-derived position_ids that nnsight supplies for a left-padded text batch.
    (`output_hidden_states` is not used: in transformers 5 its last entry is after the final
    norm, not the last layer's output.)
    """
    import torch
    from nnsight.modeling.processing import supply_position_ids

    from mars_core.model import _get_path

    enc = dict(batch.inputs)
    supply_position_ids(mm.nn, enc)
    mods = _get_path(mm.hf, mm.family.layers_path)
    outs: dict[int, torch.Tensor] = {}

    def hook(i):
        return lambda m, a, o: outs.__setitem__(i, o[0] if isinstance(o, tuple) else o)

    handles = [mods[i].register_forward_hook(hook(i)) for i in layers]
    try:
        with torch.no_grad():
            mm.hf(**enc)
    finally:
        for h in handles:
            h.remove()
    idx = list(batch.post_positions)
    err = 0.0
    for layer, g in zip(layers, got):
        ref = outs[layer][:, idx].to(torch.float64).sum(0)
        err = max(err, float((g - ref).abs().max() / (ref.abs().max() + 1e-12)))
    return err


def med(xs) -> float:
    return statistics.median(xs)


def paired_ratio(num: list[float], den: list[float]) -> float:
    return med([a / b for a, b in zip(num, den)])


# ---------------------------------------------------------------------------------------
# 1. time
# ---------------------------------------------------------------------------------------
def time_model(
    label: str, mm, vanilla, prompts, *, reps, warmup: int, images: bool, diagnose: bool, wrapped: bool, e2e: bool
) -> list[dict]:
    """Time plain forward (`vanilla`: an unwrapped copy of mm.hf) vs `_read` all layers.

    reps: an int, or a dict {"text": n, "image": n}. wrapped: also time a plain forward of
    the nnsight-wrapped model outside any trace (load_model instruments every module).
    """
    import torch

    from mars_core import collect_activations
    from mars_core.capture import _read
    from mars_core.testing import make_image

    layers = list(range(mm.n_layers))
    half = layers[: mm.n_layers // 2]
    rows = []
    kinds = [("text", None)]
    if images:
        kinds.append(("image", [make_image(i) for i in range(len(prompts))]))
    for kind, ims in kinds:
        batch = mm.build_batch(prompts, images=ims)
        pos = batch.post_positions

        def plain():
            with torch.no_grad():
                vanilla(**batch.inputs)

        def capture():  # exactly what collect_activations runs per batch
            return _read(mm, batch, layers, pos, "mean", False)

        def capture_half():  # layers up to half depth: _read stops the forward after the deepest
            return _read(mm, batch, half, pos, "mean", False)

        def plain_wrapped():
            with torch.no_grad():
                mm.hf(**batch.inputs)

        fns = {"plain": plain, "capture": capture, "capture_half": capture_half}
        if wrapped:
            fns["plain_wrapped"] = plain_wrapped
        if diagnose:

            def capture_nograd():
                with torch.no_grad():
                    return _read(mm, batch, layers, pos, "mean", False)

            def empty_trace():
                with mm.nn.trace(batch.inputs):
                    pass

            fns["capture_nograd"] = capture_nograd
            fns["empty_trace"] = empty_trace
        if e2e:

            def build_plain():
                b = mm.build_batch(prompts, images=ims)
                with torch.no_grad():
                    vanilla(**b.inputs)

            def collect():
                collect_activations(mm, prompts, images=ims, reduce="mean", batch_size=len(prompts), progress=False)

            fns["build+plain"] = build_plain
            fns["collect"] = collect

        full = capture()
        err = check_capture(mm, batch, full, layers)  # also a warm-up of both paths
        # the stopped capture reads the same values as the full one at the layers it reads
        err_half = max(float((a - b).abs().max() / (b.abs().max() + 1e-12)) for a, b in zip(capture_half(), full))
        plain()
        n_reps = reps[kind] if isinstance(reps, dict) else reps
        shape = tuple(batch.inputs["input_ids"].shape)
        log(
            f"  [{label} / {kind}] batch {shape[0]}x{shape[1]} tokens, {len(pos)} post positions x "
            f"{len(layers)} layers; capture vs forward-hook reference: max rel. err {err:.1e}; "
            f"{n_reps} reps after {warmup} warm-up"
        )
        t = interleaved(fns, n_reps, warmup)
        row = dict(model=label, kind=kind, shape=shape, err=err, err_half=err_half, reps=n_reps)
        for clk in ("wall", "cpu"):
            row[f"plain_{clk}"] = 1e3 * med(t["plain"][clk])
            row[f"capture_{clk}"] = 1e3 * med(t["capture"][clk])
            row[f"ratio_{clk}"] = paired_ratio(t["capture"][clk], t["plain"][clk])
            row[f"half_{clk}"] = 1e3 * med(t["capture_half"][clk])
            row[f"ratio_half_{clk}"] = paired_ratio(t["capture_half"][clk], t["plain"][clk])
        ms = lambda xs: "/".join(f"{1e3 * x:.0f}" for x in xs)  # noqa: E731
        msg = (
            f"    wall: plain {row['plain_wall']:.1f} ms, capture {row['capture_wall']:.1f} ms, "
            f"ratio {row['ratio_wall']:.3f}\n"
            f"    cpu:  plain {row['plain_cpu']:.1f} ms, capture {row['capture_cpu']:.1f} ms, "
            f"ratio {row['ratio_cpu']:.3f} (overhead {row['capture_cpu'] - row['plain_cpu']:+.1f} ms)\n"
            f"    stop early (layers 0..{len(half) - 1} of {len(layers)}, forward stopped after the last): "
            f"cpu {row['half_cpu']:.1f} ms, ratio {row['ratio_half_cpu']:.3f}; wall ratio {row['ratio_half_wall']:.3f}; "
            f"equal to the full capture's layers within {err_half:.1e} rel."
        )
        if wrapped:
            row["wrapped_cpu"] = 1e3 * med(t["plain_wrapped"]["cpu"])
            row["ratio_wrapped"] = paired_ratio(t["plain_wrapped"]["cpu"], t["plain"]["cpu"])
            msg += (
                f"\n    plain forward of the nnsight-wrapped model, outside a trace (cpu): "
                f"{row['wrapped_cpu']:.1f} ms (x{row['ratio_wrapped']:.3f})"
            )
        if len(t["plain"]["wall"]) <= 12:
            msg += f"\n    per rep wall ms: plain {ms(t['plain']['wall'])}; capture {ms(t['capture']['wall'])}"
        if diagnose:
            for key, name in (("nograd", "capture_nograd"), ("empty", "empty_trace")):
                row[f"{key}_cpu"] = 1e3 * med(t[name]["cpu"])
                row[f"ratio_{key}"] = paired_ratio(t[name]["cpu"], t["plain"]["cpu"])
            msg += (
                f"\n    diagnose (cpu): capture under torch.no_grad {row['nograd_cpu']:.1f} ms "
                f"(x{row['ratio_nograd']:.3f}), empty nnsight trace {row['empty_cpu']:.1f} ms "
                f"(x{row['ratio_empty']:.3f})"
            )
        if e2e:
            row["build_plain_cpu"] = 1e3 * med(t["build+plain"]["cpu"])
            row["collect_cpu"] = 1e3 * med(t["collect"]["cpu"])
            row["ratio_e2e"] = paired_ratio(t["collect"]["cpu"], t["build+plain"]["cpu"])
            msg += (
                f"\n    end to end (cpu): build_batch+plain {row['build_plain_cpu']:.1f} ms, "
                f"collect_activations {row['collect_cpu']:.1f} ms (x{row['ratio_e2e']:.3f})"
            )
        log(msg)
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------
# 2. memory (child processes)
# ---------------------------------------------------------------------------------------
def mem_prompts(n: int, kind: str = "distinct") -> list[str]:
    """n prompts: "distinct" (numbered, all different, as a real prompt set) or "repeated"
    (the 8 PROMPTS cycled)."""
    if kind == "repeated":
        return [PROMPTS[i % len(PROMPTS)] for i in range(n)]
    return [f"Question {i}: {PROMPTS[i % len(PROMPTS)]}" for i in range(n)]


class _MallInfo2:
    """glibc mallinfo2 (all arenas): bytes in use and free-but-held by malloc, MiB; None if
    unavailable (not glibc, or glibc < 2.33)."""

    def __init__(self):
        import ctypes

        class MI2(ctypes.Structure):
            _fields_ = [
                (f, ctypes.c_size_t)
                for f in "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()
            ]

        try:
            self.libc = ctypes.CDLL("libc.so.6")
            self.libc.mallinfo2.restype = MI2
        except (OSError, AttributeError):
            self.libc = None

    def __call__(self):
        if self.libc is None:
            return None
        m = self.libc.mallinfo2()
        return {"in_use": (m.uordblks + m.hblkhd) / 2**20, "free_held": m.fordblks / 2**20}

    def trim(self) -> None:
        if self.libc is not None:
            self.libc.malloc_trim(0)


class _Sampler(threading.Thread):
    """Polls VmRSS every `dt` seconds; `peak` is the largest value seen (kB)."""

    def __init__(self, dt: float = 0.002):
        super().__init__(daemon=True)
        self.dt, self.peak, self._done = dt, status_kb(), threading.Event()

    def run(self):
        while not self._done.is_set():
            self.peak = max(self.peak, status_kb())
            time.sleep(self.dt)

    def stop(self):
        self._done.set()
        self.join()
        self.peak = max(self.peak, status_kb())


def mem_child(n: int, threads: int, batch_size: int, kind: str = "distinct") -> dict:
    """In a fresh process: peak memory of collect_activations(reduce="mean") on n prompts.

    First call (cold: the model is loaded, no capture has run yet): peak RSS during the call
    and that peak minus the RSS just before it. Second call on the same prompts (warm): the
    tracemalloc peak of the Python heap (tracemalloc would slow and inflate the first).
    """
    import resource
    import tracemalloc

    set_threads(threads)
    import mars_core

    tiny = tiny_llava()
    mm = mars_core.load_model(tiny.model, tiny.processor)
    texts = mem_prompts(n, "repeated" if kind == "repeated" else "distinct")
    mall = _MallInfo2()
    cache_off = False
    if kind == "nocache":  # control: the same distinct prompts, the tokenizer's word cache off
        model = getattr(getattr(mm.tokenizer, "_tokenizer", None), "model", None)
        if hasattr(model, "_resize_cache"):
            model._resize_cache(0)
            cache_off = True

    def call():
        return mars_core.collect_activations(mm, texts, reduce="mean", batch_size=batch_size, progress=False)

    gc.collect()
    m0 = mall()
    rss0 = status_kb()
    maxrss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    hwm = reset_hwm()
    sampler = None if hwm else _Sampler()
    if sampler:
        sampler.start()
    t0 = time.perf_counter()
    ds = call()
    secs = time.perf_counter() - t0
    if sampler:
        sampler.stop()
    peak = status_kb("VmHWM") if hwm else sampler.peak
    out = dict(
        n=n,
        seconds=secs,
        method="VmHWM" if hwm else "sampled VmRSS",
        rss_before_kb=rss0,
        peak_rss_kb=peak,
        peak_above_before_kb=peak - rss0,
        rss_after_kb=status_kb(),
        maxrss_delta_kb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - maxrss0,
    )
    assert int(ds["count"]) == n
    del ds
    gc.collect()
    m1 = mall()
    if m0 is not None:  # after the call: where the extra RSS sits (malloc in use / free but held)
        out.update({f"malloc_{k}_growth_mib": m1[k] - m0[k] for k in m0})
        mall.trim()
        out["rss_after_trim_kb"] = status_kb()
    out.update(kind=kind, cache_off=cache_off)
    if kind == "nocache":  # the control needs the RSS figures only
        return out
    gc.collect()
    tracemalloc.start()
    t0 = time.perf_counter()
    ds = call()  # held until the reading: "retained" counts the result the caller would keep
    out["tm_seconds"] = time.perf_counter() - t0
    cur, tpeak = tracemalloc.get_traced_memory()
    del ds
    tracemalloc.stop()
    out.update(tracemalloc_peak_kb=tpeak / 1024, tracemalloc_retained_kb=cur / 1024)
    return out


def start_memory_children(jobs: list[tuple[str, int]], threads: int, batch_size: int) -> dict:
    """One fresh subprocess per (prompt kind, size), started side by side (memory does not
    care about CPU share); the main process builds its models meanwhile and waits for them
    before it times anything."""
    env = dict(os.environ, TQDM_DISABLE="1")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--threads", str(threads), "--batch-size", str(batch_size)]
    return {
        (kind, n): subprocess.Popen(
            cmd + ["--_mem-child", str(n), "--_mem-kind", kind],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for kind, n in jobs
    }


def finish_memory_children(procs: dict) -> dict:
    res = {}
    for (kind, n), p in procs.items():
        out, err = p.communicate()
        if p.returncode != 0:
            raise RuntimeError(f"memory child for {n} {kind} prompts failed:\n{err[-3000:]}")
        r = res[kind, n] = json.loads(out.strip().splitlines()[-1])
        label = "distinct, tokenizer cache off" if kind == "nocache" else kind
        msg = (
            f"  [{n:>5} {label} prompts] cold call {r['seconds']:.1f} s: RSS before {r['rss_before_kb'] / 1024:.1f} MiB, "
            f"peak ({r['method']}) {r['peak_rss_kb'] / 1024:.1f} MiB = +{r['peak_above_before_kb'] / 1024:.2f} MiB, "
            f"ru_maxrss growth {r['maxrss_delta_kb'] / 1024:.2f} MiB"
        )
        if "malloc_in_use_growth_mib" in r:
            msg += (
                f"\n  {'':>22} after the call: malloc in use +{r['malloc_in_use_growth_mib']:.2f} MiB, free but held "
                f"+{r['malloc_free_held_growth_mib']:.2f} MiB; RSS above pre-call after malloc_trim "
                f"+{(r['rss_after_trim_kb'] - r['rss_before_kb']) / 1024:.2f} MiB"
            )
        if "tm_seconds" in r:
            msg += (
                f"\n  {'':>22} warm call {r['tm_seconds']:.1f} s: tracemalloc peak "
                f"{r['tracemalloc_peak_kb'] / 1024:.3f} MiB, retained at return {r['tracemalloc_retained_kb'] / 1024:.3f} MiB"
            )
        log(msg)
    return res


# ---------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="few repetitions, small sizes (about a minute)")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1; see README)")
    ap.add_argument("--reps", type=int, default=None, help="timed repetitions per measurement")
    ap.add_argument("--warmup", type=int, default=None, help="extra warm-up calls per measurement")
    ap.add_argument("--clock", choices=("cpu", "wall"), default="cpu", help="clock the time target is judged on")
    ap.add_argument("--no-images", action="store_true", help="time text batches only")
    ap.add_argument("--diagnose", action="store_true", help="also time capture under no_grad and an empty trace")
    ap.add_argument("--skip-time", action="store_true")
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--mem-sizes", default=None, help="two prompt counts (default 256,4096; quick 32,256)")
    ap.add_argument("--batch-size", type=int, default=8, help="collect_activations batch size (memory part)")
    ap.add_argument(
        "--mem-control", choices=("auto", "on", "off"), default="auto",
        help="also measure the memory sizes with the tokenizer's BPE word cache off (a control; auto: on in full mode)",
    )  # fmt: skip
    ap.add_argument("--_mem-child", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--_mem-kind", default="distinct", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)

    if a._mem_child is not None:
        print(json.dumps(mem_child(a._mem_child, a.threads, a.batch_size, a._mem_kind)), flush=True)
        return 0

    t_start = time.perf_counter()
    set_threads(a.threads)
    import nnsight
    import torch
    import transformers

    import mars_core

    mode = "quick" if a.quick else "full"
    reps = a.reps or (4 if a.quick else 20)
    big_reps = a.reps or (3 if a.quick else {"text": 10, "image": 6})
    warmup = a.warmup if a.warmup is not None else (0 if a.quick else 1)
    sizes = [int(s) for s in (a.mem_sizes or ("32,256" if a.quick else "256,4096")).split(",")]
    if len(sizes) != 2:
        ap.error("--mem-sizes takes two prompt counts, e.g. 256,4096")
    log(
        f"capture_overhead ({mode}): torch {torch.__version__}, transformers {transformers.__version__}, "
        f"nnsight {getattr(nnsight, '__version__', '?')}, mars_core {mars_core.__version__}"
    )
    log(
        f"torch threads: intra-op {torch.get_num_threads()}, inter-op {torch.get_num_interop_threads()} "
        f"(os.cpu_count() {os.cpu_count()}, load average {os.getloadavg()[0]:.1f}); time target judged on the "
        f"{a.clock} clock"
    )

    summary: list[tuple[str, str, str, str]] = []  # (measure, value, target, verdict)
    ok = True

    control = a.mem_control == "on" or (a.mem_control == "auto" and not a.quick)
    kinds = ["distinct"] + (["nocache"] if control else [])
    procs = None
    if not a.skip_memory:
        procs = start_memory_children([(k, n) for k in kinds for n in sizes], a.threads, a.batch_size)

    if not a.skip_time:  # build while the memory children run; time only after they are done
        # the plain baseline runs an unwrapped copy: load_model instruments the model in place
        tiny = tiny_llava()
        tiny_vanilla = copy.deepcopy(tiny.model)
        mm_tiny = mars_core.load_model(tiny.model, tiny.processor)
        t0 = time.perf_counter()
        big = build_big(tiny)
        big_vanilla = copy.deepcopy(big)
        mm_big = mars_core.load_model(big, tiny.processor)
        built = time.perf_counter() - t0

    if procs is not None:
        log(
            f"\n== memory: collect_activations(reduce='mean') on the tiny llava, {sizes[0]} vs {sizes[1]} "
            f"prompts (batch {a.batch_size}), a fresh process each =="
        )
        mem = finish_memory_children(procs)
        lo, hi = mem["distinct", sizes[0]], mem["distinct", sizes[1]]
        inc_ratio = hi["peak_above_before_kb"] / max(lo["peak_above_before_kb"], 1)
        # the target is judged with the tokenizer's word cache bounded (off: the control) where the
        # control ran and could switch it off, so the ratio reflects the collector (issue 14); the
        # default tokenizer's row is then information
        judged_on_control = control and mem["nocache", sizes[1]]["cache_off"]
        good = inc_ratio <= TARGET_MEM_RATIO
        if not judged_on_control:
            ok &= good
        summary += [
            (
                f"peak RSS above pre-call RSS, {sizes[1]}/{sizes[0]} prompts" + (", default tokenizer" if control else ""),
                f"{inc_ratio:.3f} ({hi['peak_above_before_kb'] / 1024:.1f} vs {lo['peak_above_before_kb'] / 1024:.1f} MiB)",
                "(info)" if judged_on_control else f"<= {TARGET_MEM_RATIO:.2f}",
                "-" if judged_on_control else ("PASS" if good else "FAIL"),
            ),
            (
                f"peak process RSS, {sizes[1]}/{sizes[0]} prompts",
                f"{hi['peak_rss_kb'] / lo['peak_rss_kb']:.3f} ({hi['peak_rss_kb'] / 1024:.0f} vs {lo['peak_rss_kb'] / 1024:.0f} MiB)",
                "(info)",
                "-",
            ),
            (
                f"tracemalloc peak (warm call), {sizes[1]}/{sizes[0]} prompts",
                f"{hi['tracemalloc_peak_kb'] / lo['tracemalloc_peak_kb']:.3f} "
                f"({hi['tracemalloc_peak_kb'] / 1024:.2f} vs {lo['tracemalloc_peak_kb'] / 1024:.2f} MiB)",
                "(info)",
                "-",
            ),
        ]
        if "malloc_in_use_growth_mib" in hi:
            summary.append(
                (
                    f"malloc in use / free-held growth, {sizes[1]} vs {sizes[0]} prompts",
                    f"{hi['malloc_in_use_growth_mib']:.1f}/{hi['malloc_free_held_growth_mib']:.1f} vs "
                    f"{lo['malloc_in_use_growth_mib']:.1f}/{lo['malloc_free_held_growth_mib']:.1f} MiB",
                    "(info)",
                    "-",
                )
            )
        if control:
            clo, chi = mem["nocache", sizes[0]], mem["nocache", sizes[1]]
            off = "off" if chi["cache_off"] else "NOT off (no _resize_cache)"
            c_ratio = chi["peak_above_before_kb"] / max(clo["peak_above_before_kb"], 1)
            c_good = c_ratio <= TARGET_MEM_RATIO
            if judged_on_control:
                ok &= c_good
            summary.append(
                (
                    f"tokenizer word cache {off}: peak RSS above pre-call, {sizes[1]}/{sizes[0]}",
                    f"{c_ratio:.3f} ({chi['peak_above_before_kb'] / 1024:.1f} vs {clo['peak_above_before_kb'] / 1024:.1f} MiB)",
                    f"<= {TARGET_MEM_RATIO:.2f}" if judged_on_control else "(info)",
                    ("PASS" if c_good else "FAIL") if judged_on_control else "-",
                )
            )

    if not a.skip_time:
        log("\n== time: plain forward vs all-layer capture (nnsight), interleaved ==")
        log(f"tiny llava: {n_params(tiny.model):,} parameters, {mm_tiny.n_layers} layers, d_model {mm_tiny.d_model}")
        log(
            f"200M llava: {n_params(big):,} parameters ({n_params(big.model.language_model):,} in the Llama "
            f"text backbone), {mm_big.n_layers} layers, d_model {mm_big.d_model}, intermediate "
            f"{BIG_TEXT['intermediate_size']}, vocab {big.config.get_text_config().vocab_size}; built in {built:.1f} s"
        )
        images = not a.no_images
        rows = time_model(
            "tiny", mm_tiny, tiny_vanilla, PROMPTS, reps=reps, warmup=warmup, images=images, diagnose=a.diagnose,
            wrapped=True, e2e=not a.quick,
        )  # fmt: skip
        # quick mode: half the batch at 200M (a forward of 8 prompts takes seconds on one core)
        big_prompts = PROMPTS[:4] if a.quick else PROMPTS
        rows += time_model(
            "200M", mm_big, big_vanilla, big_prompts, reps=big_reps, warmup=warmup, images=images and not a.quick,
            diagnose=a.diagnose, wrapped=a.diagnose, e2e=False,
        )  # fmt: skip
        for r in rows:
            name = f"time capture/plain, {r['model']} {r['kind']} {r['shape'][0]}x{r['shape'][1]}"
            val = (
                f"{r['ratio_' + a.clock]:.3f} {a.clock} ({r['capture_' + a.clock]:.0f} vs {r['plain_' + a.clock]:.0f} ms;"
                f" {'wall' if a.clock == 'cpu' else 'cpu'} {r['ratio_' + ('wall' if a.clock == 'cpu' else 'cpu')]:.3f})"
            )
            if r["model"] == "200M":
                good = r["ratio_" + a.clock] <= TARGET_TIME_RATIO
                ok &= good
                summary.append((name, val, f"<= {TARGET_TIME_RATIO:.2f}", "PASS" if good else "FAIL"))
            else:
                summary.append((name, val, "(info)", "-"))
            other = "wall" if a.clock == "cpu" else "cpu"
            hname = f"time stop early (half the layers)/plain, {r['model']} {r['kind']}"
            hval = (f"{r['ratio_half_' + a.clock]:.3f} {a.clock} ({r['half_' + a.clock]:.0f} vs {r['plain_' + a.clock]:.0f} ms;"
                    f" {other} {r['ratio_half_' + other]:.3f}; values equal {r['err_half']:.0e})")
            if r["model"] == "200M":
                good = r["ratio_half_" + a.clock] <= TARGET_STOP_RATIO and r["err_half"] <= 1e-6
                ok &= good
                summary.append((hname, hval, f"<= {TARGET_STOP_RATIO:.2f}", "PASS" if good else "FAIL"))
            else:
                summary.append((hname, hval, "(info)", "-"))
            if "ratio_wrapped" in r:
                summary.append(
                    (
                        f"time plain(wrapped by load_model)/plain, {r['model']} {r['kind']}",
                        f"{r['ratio_wrapped']:.3f} cpu ({r['wrapped_cpu']:.1f} vs {r['plain_cpu']:.1f} ms)",
                        "(info)",
                        "-",
                    )
                )
            if "ratio_e2e" in r:
                summary.append(
                    (
                        f"time collect_activations/(build_batch+plain), {r['model']} {r['kind']}",
                        f"{r['ratio_e2e']:.3f} cpu ({r['collect_cpu']:.0f} vs {r['build_plain_cpu']:.0f} ms)",
                        "(info)",
                        "-",
                    )
                )

    if summary:
        w = max(len(s[0]) for s in summary)
        v = max(len(s[1]) for s in summary)
        log(
            f"\n== summary ({mode}, {torch.get_num_threads()} torch thread(s), "
            f"{time.perf_counter() - t_start:.0f} s) =="
        )
        log(f"{'measure':<{w}}  {'value':<{v}}  {'target':<8}  result")
        log("-" * (w + v + 26))
        for name, val, tgt, verdict in summary:
            log(f"{name:<{w}}  {val:<{v}}  {tgt:<8}  {verdict}")
        log(f"overall: {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
