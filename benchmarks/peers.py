#!/usr/bin/env python
"""Benchmark: the package side by side with the tools a researcher would otherwise use (issue 14).

Job **extract**: difference-of-means refusal directions at every decoder layer (the residual
stream output of each layer, at every post-instruction position where the tool can read it,
else the last prompt position) from N harmful + N harmless chat-formatted prompts, on
SmolLM2-135M-Instruct in float32 (real weights, offline: `mars_core.organism.smol.base`), or with
`--model llava` on the ~200M random LLaVA of benchmarks/capture_overhead.py (seed 0, saved once
under --out) with an image per prompt (`mars_core.testing.make_image`; the batches carry
pixel_values): the package reads it with `collect_activations(mm, texts, images=...)` per side
(RefusalDirections.extract is text-only), repeng cannot pass images, mars-head and steer are
SmolLM2 only.

Tools, each in its own process (benchmarks/peers/run_<tool>.py):
  mars              `mars_core.RefusalDirections.extract` (end to end from the prompt strings)
  mars-head         the same with `share_head=True`: each batch's shared chat-template head run
                    once, the rest of each row read over its key/value cache (extract only)
  hooks             raw PyTorch forward hooks on each decoder layer (baseline, benchmark only)
  steering-vectors  0.12.2, `record_activations` + `aggregate_activations(mean_aggregator())`
  repeng            0.4.0, its reader `batched_get_hiddens` + a mean difference
  nnterp            1.3.0 on nnsight 0.7.0 (own virtualenv), `layers_output[i]` in a trace
  transformer-lens  4.3.0 (own virtualenv), `TransformerBridge` + `run_with_cache`; steer: a hook
                    in `bridge.hooks(...)` around the bridge's greedy `generate` without its
                    key/value cache (its cached loop repeats one token on SmolLM2)
The peers are installed by `bash benchmarks/peers/setup.sh` under benchmarks/peers/.envs/; a
peer that is not installed or cannot run is listed with the reason.

Inputs: the package builds every batch once (`mm.build_batch`: chat template, left padding) and
every tool gets the same input_ids / attention_mask (repeng tokenizes itself; its runner checks
that it gets the same ids). Agreement before timing: cosine >= 0.9999 to the package's direction
at every (layer, position) compared; a tool that disagrees is reported and not timed.
Timing, inside each runner: the tool's extraction against a plain `output_hidden_states`
forward of the same batches in the same process, ABBA-interleaved repetitions after the
warm-up (the first call, which also gives the output), both clocks (wall: perf_counter; cpu:
process_time), median of the per-repetition ratios. Memory: the runner's peak RSS during the
first extraction above its RSS before it, and the process's ru_maxrss.

Job **steer**: greedy generation (quick 4 prompts x 8 tokens, full 16 x 32, min_new_tokens equal
to max_new_tokens) of held-out harmless requests with a fixed vector (the package's mean
difference at --steer-layer, position -1) added to that layer's output at the last column: at the
prefill only ("first": the first generated token; the package's `ActAdd(scope="first")`) and at
every forward pass ("every": the last prompt column and each generated token; `scope="every"`),
unsteered as the reference. Agreement: each mode's generated token ids equal the package's.
Timing: each mode and a plain HF `model.generate` of the same ids, interleaved in the tool's
process. Peers that cannot express a mode say why (steering-vectors: no prefill-only edit;
repeng: its control edits every column of every pass).

Targets (PASS/FAIL, exit 1 on FAIL): the package's extract ratio <= the fastest agreeing peer's
(on --clock, cpu by default), judged on the package's faster way (mars-head where it ran; the
default's line is printed as information). Ratios, not absolute times, are compared: each tool runs in its own
process at its own moment, and the ratio to a plain forward measured alongside cancels most of
the drift of a shared machine. Steer: the package's first-token steered generate <= 1.02x its
unsteered generate, and its ratio to plain generate no higher than any peer's first-token one.

The other jobs of issue 14 are their own scripts (each compares the package with a full-forward
or raw-hook re-implementation in one process): fit MARS `benchmarks/fit_sweeps.py`, select
`benchmarks/select_sweep.py`, stop early and memory `benchmarks/capture_overhead.py`.

Usage:
    bash benchmarks/peers/setup.sh                 # once: the peers' environments
    python benchmarks/peers.py --quick             # extract 16 + 16 prompts, 3 reps; steer 4 x 8, 2 reps
    python benchmarks/peers.py                     # extract 256 + 256 prompts, 5 reps; steer 16 x 32, 5 reps
    python benchmarks/peers.py --model llava --n 64 --reps 3   # extract with images at ~200M
Options: --model {smol,llava}, --jobs extract,steer, --n N (prompts per side), --reps N, --batch-size N, --tools a,b,
--clock {cpu,wall}, --steer-prompts N, --steer-tokens N, --steer-layer L, --diagnose (time the
package's per-batch trace alone too), --out DIR (JSON, directions, token ids; default a temporary
folder).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
PEERS = ROOT / "benchmarks" / "peers"
sys.path.insert(1, str(PEERS))
from common import fmt_table  # noqa: E402  (benchmarks/peers/common.py; stdlib only at import)
ENVS = PEERS / ".envs"

# name -> (runner, interpreter, folders first on PYTHONPATH, install check, setup name)
TOOLS = {
    "mars": ("run_mars.py", None, [], None, None),
    "mars-head": ("run_mars.py", None, [], None, None),  # extract only: share_head=True (MARS_PEERS_SHARE_HEAD)
    "hooks": ("run_hooks.py", None, [], None, None),
    "steering-vectors": ("run_sv.py", None, [ENVS / "sv"], ENVS / "sv" / ".done", "sv"),
    "repeng": ("run_repeng.py", None, [ENVS / "repeng"], ENVS / "repeng" / ".done", "repeng"),
    "nnterp": ("run_nnterp.py", ENVS / "nnterp" / "bin" / "python", [], ENVS / "nnterp" / ".done", "nnterp"),
    "transformer-lens": ("run_tlens.py", ENVS / "tlens" / "bin" / "python", [], ENVS / "tlens" / ".done", "tlens"),
}


def log(msg: str = "") -> None:
    print(msg, flush=True)


def prompts(n: int) -> tuple[list[str], list[str]]:
    """n harmful and n harmless user requests: the SmolLM2 organism's training topics x training
    templates, a fixed draw (seed 0)."""
    from mars_core.organism.smol import data as D

    rng = random.Random(0)
    harm = D.combos(D.HARMFUL_TRAIN, D.TEXT_TEMPLATES_TRAIN, True)
    safe = D.combos([p for p in D.HARMLESS_TRAIN], D.TEXT_TEMPLATES_TRAIN, False)
    if n > min(len(harm), len(safe)):
        raise SystemExit(f"--n {n}: at most {min(len(harm), len(safe))} prompts per side")
    return [r.text for r in rng.sample(harm, n)], [r.text for r in rng.sample(safe, n)]


def build_llava(path: Path) -> Path:
    """The ~200M random LLaVA of benchmarks/capture_overhead.py (Llama text backbone 1024 x 16, the
    tiny CLIP tower, seed 0) with the tiny llava's processor, saved for every runner to load."""
    if (path / "config.json").is_file():
        return path
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from capture_overhead import build_big, tiny_llava

    tiny = tiny_llava()
    big = build_big(tiny)
    big.save_pretrained(path)
    tiny.processor.save_pretrained(path)
    del big
    return path


def build_batches(model_dir: Path, kind: str, harmful, harmless, bs: int, path: Path) -> dict:
    """The package's batches (mm.build_batch), saved for every runner. kind "llava": each prompt
    with an image (`mars_core.testing.make_image(i)`, harmful 0..n-1, harmless n..2n-1), the
    batches carry pixel_values too."""
    import torch

    import mars_core

    if kind == "llava":
        from transformers import AutoProcessor, LlavaForConditionalGeneration

        from mars_core.testing import make_image

        model = LlavaForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32, local_files_only=True)
        tok = AutoProcessor.from_pretrained(model_dir, local_files_only=True)
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, local_files_only=True)
        tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    mm = mars_core.load_model(model.eval(), tok)
    out: dict = {"texts": {"harmful": harmful, "harmless": harmless}, "rendered": {}}
    if kind == "llava":
        out["image_ids"] = {"harmful": list(range(len(harmful))),
                            "harmless": list(range(len(harmful), len(harmful) + len(harmless)))}
    positions = None
    for side, texts in (("harmful", harmful), ("harmless", harmless)):
        out[side], out["rendered"][side] = [], []
        for i in range(0, len(texts), bs):
            ims = [make_image(j) for j in out["image_ids"][side][i:i + bs]] if kind == "llava" else None
            b = mm.build_batch(texts[i:i + bs], images=ims)
            keep = ("input_ids", "attention_mask") + (("pixel_values",) if kind == "llava" else ())
            out[side].append({k: b.inputs[k] for k in keep})
            out["rendered"][side] += b.rendered
            if positions is None:
                positions = b.post_positions
                out["post_tokens"] = list(b.post_tokens)
            assert b.post_positions == positions
    out["positions"] = list(positions)
    torch.save(out, path)
    shapes = [tuple(b["input_ids"].shape) for s in ("harmful", "harmless") for b in out[s]]
    n_params = sum(p.numel() for p in model.parameters())
    return {"positions": out["positions"], "post_tokens": out["post_tokens"], "shapes": shapes,
            "n_layers": mm.n_layers, "d_model": mm.d_model, "n_params": n_params,
            "image_shape": tuple(out["harmful"][0]["pixel_values"].shape[1:]) if kind == "llava" else None}


def run_tool(name: str, job: str, spec_path: Path, out_dir: Path, timeout: float) -> dict:
    runner, py, extra_path, done, setup_name = TOOLS[name]
    if done is not None and not done.is_file():
        return {"tool": name, "status": "not installed",
                "error": f"not installed: run `bash benchmarks/peers/setup.sh {setup_name}`"}
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TQDM_DISABLE="1", HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join([str(p) for p in extra_path] + [str(PEERS)])
    if name == "mars-head":
        env["MARS_PEERS_SHARE_HEAD"] = "1"
    if py is None:  # the package's interpreter; the checkout's mars_core is put on the path by the runner
        py = Path(sys.executable)
    t0 = time.perf_counter()
    try:
        p = subprocess.run([str(py), str(PEERS / runner), job, str(spec_path)], env=env, capture_output=True,
                           text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"tool": name, "status": "error", "error": f"timed out after {timeout:.0f} s"}
    res_path = out_dir / f"{job}_{name}.json"
    if not res_path.is_file():
        tail = (p.stderr or p.stdout or "").strip().splitlines()[-3:]
        return {"tool": name, "status": "error", "error": f"runner exited {p.returncode}: {' | '.join(tail)}"}
    res = json.loads(res_path.read_text())
    res["process_s"] = time.perf_counter() - t0
    (out_dir / f"{job}_{name}.stderr").write_text(p.stderr or "")
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="extract 16 + 16 prompts, steer 4 x 8 tokens: a check that every tool runs and agrees (~7 min)")
    ap.add_argument("--n", type=int, default=None, help="prompts per side (quick 16, full 256)")
    ap.add_argument("--reps", type=int, default=None, help="timed repetitions after the warm-up (quick 3, full 5)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--tools", default=",".join(TOOLS), help="comma-separated subset of " + ",".join(TOOLS))
    ap.add_argument("--clock", choices=("cpu", "wall"), default="cpu")
    ap.add_argument("--out", default=None, help="folder for the JSON results and directions")
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds per tool process")
    ap.add_argument("--jobs", default="extract,steer", help="comma-separated: extract, steer")
    ap.add_argument("--steer-prompts", type=int, default=None, help="steer: prompts (quick 4, full 16)")
    ap.add_argument("--steer-tokens", type=int, default=None, help="steer: new tokens (quick 8, full 32)")
    ap.add_argument("--steer-layer", type=int, default=15, help="steer: the decoder layer edited")
    ap.add_argument("--diagnose", action="store_true", help="extract: also time the package's per-batch trace alone")
    ap.add_argument("--model", choices=("smol", "llava"), default="smol",
                    help="smol: SmolLM2-135M-Instruct (real weights); llava: the ~200M random LLaVA of "
                         "capture_overhead.py with an image per prompt (extract only)")
    a = ap.parse_args(argv)
    jobs = [j.strip() for j in a.jobs.split(",") if j.strip()]
    if not set(jobs) <= {"extract", "steer"}:
        ap.error(f"--jobs {a.jobs}: choose from extract, steer")
    n = a.n or (16 if a.quick else 256)
    reps = a.reps or (3 if a.quick else 5)
    tools = [t.strip() for t in a.tools.split(",") if t.strip()]
    unknown = [t for t in tools if t not in TOOLS]
    if unknown:
        ap.error(f"unknown tools {unknown}; choose from {list(TOOLS)}")
    if "mars" not in tools:
        tools.insert(0, "mars")  # the reference every other tool is checked against
    skipped = []
    if a.model == "llava":
        if "steer" in jobs:
            jobs.remove("steer")
            skipped.append("job steer: SmolLM2 only (its vector and judged tokens need real weights)")
        if "mars-head" in tools:
            tools.remove("mars-head")
            skipped.append("mars-head: share_head declines batches with images (the head is not shared), "
                           "so it would repeat the mars row")
    out_dir = Path(a.out or tempfile.mkdtemp(prefix="mars_peers_"))
    out_dir.mkdir(parents=True, exist_ok=True)

    t_start = time.perf_counter()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch
    import transformers

    import mars_core
    from mars_core.organism.smol.base import base_dir

    torch.set_num_threads(1)
    mode = "quick" if a.quick else "full"
    log(f"peers ({mode}) {datetime.datetime.now().isoformat(timespec='seconds')}: torch {torch.__version__}, "
        f"transformers {transformers.__version__}, mars_core {mars_core.__version__} ({Path(mars_core.__file__).parent})")
    log(f"machine: {platform.machine()}, {os.cpu_count()} cpus, load average "
        f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}; 1 torch thread per process; target judged on the "
        f"{a.clock} clock; results in {out_dir}")

    model_dir = base_dir() if a.model == "smol" else build_llava(out_dir / "llava200m")
    harmful, harmless = prompts(n)
    bpath = out_dir / "batches.pt"
    info = build_batches(model_dir, a.model, harmful, harmless, a.batch_size, bpath)
    lens = sorted({s[1] for s in info["shapes"]})
    info["model"] = "SmolLM2-135M-Instruct" if a.model == "smol" else "random LLaVA ~200M, an image per prompt"
    if a.model == "smol":
        log(f"model: SmolLM2-135M-Instruct float32 ({model_dir}), {info['n_layers']} layers, d_model {info['d_model']}")
    else:
        log(f"model: random LlavaForConditionalGeneration float32 (benchmarks/capture_overhead.py build_big, seed 0), "
            f"{info['n_params']:,} parameters, {info['n_layers']} layers, d_model {info['d_model']}; one image per "
            f"prompt (mars_core.testing.make_image, pixel_values {info['image_shape']})")
    for line in skipped:
        log(f"  skipped: {line}")
    log(f"job extract: {n} harmful + {n} harmless prompts, batches of {a.batch_size} ({len(info['shapes'])} batches, "
        f"{lens[0]}-{lens[-1]} tokens, left padded), post-instruction positions {info['positions']} "
        f"{info['post_tokens']}; {reps} timed repetitions after the warm-up")

    spec = {"model_dir": str(model_dir), "model_kind": a.model, "batches": str(bpath), "out_dir": str(out_dir),
            "reps": reps, "batch_size": a.batch_size, "reference": str(out_dir / "extract_mars.safetensors"),
            "diagnose": a.diagnose}
    spec_path = out_dir / "spec_extract.json"
    spec_path.write_text(json.dumps(spec, indent=1))

    ext_tools = tools if "extract" in jobs else ["mars"]  # steer needs the package's direction
    results = {}
    for t in ext_tools:
        log(f"  running {t} ...")
        r = results[t] = run_tool(t, "extract", spec_path, out_dir, a.timeout)
        if r.get("status") == "ok" and "ratio_cpu" in r:
            log(f"    {t}: ratio cpu {r['ratio_cpu']:.3f} wall {r['ratio_wall']:.3f}; min cos "
                f"{r['agreement'].get('min_cos')}; process {r.get('process_s', 0):.0f} s")
        else:
            log(f"    {t}: {r.get('status')}: {r.get('error') or 'disagrees: ' + json.dumps(r.get('agreement'))}")
        if t == "mars" and r.get("status") != "ok":
            log("the package's run failed; nothing to compare with")
            log(r.get("traceback", ""))
            return 1

    # ------------------------------------------------------------------ table
    ok = True
    if "extract" in jobs:
        ok &= report_extract(results, tools, info, n, mode, a.clock, t_start, out_dir)
    if "steer" in jobs:
        ok &= job_steer(a, [t for t in tools if t != "mars-head"], model_dir, out_dir, results["mars"], info)
    log(f"\noverall: {'PASS' if ok else 'FAIL'} ({time.perf_counter() - t_start:.0f} s)")
    return 0 if ok else 1


def report_extract(results, tools, info, n, mode, clk, t_start, out_dir) -> bool:
    rows, notes = [], []
    for t in tools:
        r = results[t]
        if r.get("status") != "ok":
            rows.append([t, "-", "-", "-", "-", "-", "cannot run", "-"])
            notes.append(f"{t}: {r.get('error')}")
            continue
        ag = r["agreement"]
        mc = ag.get("min_cos")
        agree = "reference" if ag.get("reference") else (f"{mc:.6f} ({ag['compared']})" if mc is not None else "none")
        mem = r.get("peak_above_kb")
        mem_s = f"{mem / 1024:.0f}" if mem is not None else "?"
        pos_s = "post" if len(r["positions"]) > 1 else "last"
        if "ratio_cpu" not in r:
            rows.append([t, "-", "-", "-", mem_s, f"{r['ru_maxrss_kb'] / 1024:.0f}", f"DISAGREES {agree}", pos_s])
            continue
        rows.append([t, f"{r['tool_wall']:.2f} / {r['tool_cpu']:.2f}", f"{r['plain_wall']:.2f} / {r['plain_cpu']:.2f}",
                     f"{r['ratio_wall']:.3f} / {r['ratio_cpu']:.3f}", mem_s, f"{r['ru_maxrss_kb'] / 1024:.0f}", agree, pos_s])
        for name, x in r.get("extra", {}).items():
            rows.append([f"  ({name})", f"{x['tool_wall']:.2f} / {x['tool_cpu']:.2f}",
                         f"{x['plain_wall']:.2f} / {x['plain_cpu']:.2f}", f"{x['ratio_wall']:.3f} / {x['ratio_cpu']:.3f}",
                         "", "", "info", ""])
        for note in r.get("notes", []):
            notes.append(f"{t}: {note}")
    log(f"\n== extract: {info['model']}, {n} + {n} prompts, {info['n_layers']} layers ({mode}, "
        f"{time.perf_counter() - t_start:.0f} s) ==")
    log(fmt_table(rows, ["tool", "time s wall / cpu", "plain s wall / cpu", "ratio wall / cpu", "peak MiB",
                         "maxrss MiB", "agreement (min cos, n)", "positions"]))
    log("time: median over repetitions of the tool's extraction of all prompts; plain: the same batches through a "
        "plain output_hidden_states forward in the same process; ratio: median of per-repetition ratios; peak MiB: "
        "peak RSS during the first extraction above the RSS before it; maxrss: the whole process")
    for note in notes:
        log(f"  note: {note}")

    ours = [t for t in ("mars", "mars-head") if t in tools and f"ratio_{clk}" in results[t]]
    peers = {t: results[t][f"ratio_{clk}"] for t in tools if t not in ("mars", "mars-head") and f"ratio_{clk}" in results[t]}
    ok = True
    if peers:
        best = min(peers, key=peers.get)
        # judged on the package's fastest agreeing way (share_head=True where it ran); the default's line is printed too
        judged = min(ours, key=lambda t: results[t][f"ratio_{clk}"])
        for t in ours:
            mine = results[t][f"ratio_{clk}"]
            good = mine <= peers[best]
            if t == judged:
                ok &= good
            log(f"\ntarget: package extract ratio <= fastest agreeing peer's ({clk}): {t} {mine:.3f} vs {best} "
                f"{peers[best]:.3f}: {'PASS' if good else 'FAIL'}" + ("" if t == judged else " (information)"))
    else:
        log("\ntarget: no agreeing peer was timed: nothing to compare (FAIL)")
        ok = False
    (out_dir / "summary_extract.json").write_text(json.dumps({"rows": rows, "notes": notes, "ok": ok}, indent=1))
    return ok


STEER_TARGET = 1.02  # package first-token steered generate / its unsteered generate


def job_steer(a, tools, model_dir, out_dir, mars_extract, info) -> bool:
    """Job steer: greedy generation with a fixed vector (the package's mean difference at
    --steer-layer, last position) added at one layer, first token only and every token."""
    import torch
    from transformers import AutoTokenizer

    import mars_core
    from common import load_directions

    k = a.steer_tokens or (8 if a.quick else 32)
    n_p = a.steer_prompts or (4 if a.quick else 16)
    reps = a.reps or (2 if a.quick else 5)
    md, layers, positions = load_directions(mars_extract["directions"])
    layer = a.steer_layer % info["n_layers"]
    v = md[layers.index(layer), positions.index(-1)].clone()
    # harmless requests not in the extract set: the edit should turn some into refusals
    from mars_core.organism.smol import data as D

    texts = [r.text for r in random.Random(1).sample(D.combos(D.HARMLESS_HELDOUT, D.TEXT_TEMPLATES_HELDOUT, False), n_p)]
    tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    from transformers import AutoModelForCausalLM

    mm = mars_core.load_model(AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True), tok)
    b = mm.build_batch(texts)
    enc = {"input_ids": b.inputs["input_ids"], "attention_mask": b.inputs["attention_mask"]}
    del mm
    spath = out_dir / "steer.pt"
    torch.save({"vector": v, "layer": layer, "max_new_tokens": k, "texts": texts, "enc": enc}, spath)
    spec = {"model_dir": str(model_dir), "steer": str(spath), "out_dir": str(out_dir), "reps": reps}
    spec_path = out_dir / "spec_steer.json"
    spec_path.write_text(json.dumps(spec, indent=1))
    log(f"\njob steer: {n_p} prompts ({tuple(enc['input_ids'].shape)} tokens), greedy {k} new tokens "
        f"(min_new_tokens={k}), vector: the package's mean difference at layer {layer}, position -1 (norm "
        f"{float(v.norm()):.1f}), added at layer {layer}'s output at the last column: at the prefill only (first) "
        f"or at every forward pass (every); {reps} timed repetitions after the output call")
    res = {}
    for t in tools:
        log(f"  running {t} ...")
        r = res[t] = run_tool(t, "steer", spec_path, out_dir, a.timeout)
        log(f"    {t}: {r.get('status')}" + (f": {r.get('error')}" if r.get("status") != "ok" else ""))
        if t == "mars" and r.get("status") != "ok":
            log(r.get("traceback", ""))
            return False
    rows, notes = [], []
    clk = a.clock
    for t in tools:
        r = res[t]
        if r.get("status") != "ok":
            rows.append([t, "cannot run", "-", "-", "-", "-"])
            notes.append(f"{t}: {r.get('error')}")
            continue
        cells = [t]
        for m in ("none", "first", "every"):
            if m in r.get("cannot", {}):
                cells.append("cannot express")
                continue
            ag = r["agreement"].get(m, {})
            if not ag.get("agree"):
                cells.append(f"DISAGREES (tokens {ag.get('token_match', 0):.3f} equal)")
                continue
            s = f"{r[f'{m}_{clk}']:.2f} s x{r[f'{m}_ratio_{clk}']:.3f}"
            if m != "none" and f"{m}_vs_none_{clk}" in r:
                s += f" (/{'own' if t != 'mars' else 'own'} unsteered {r[f'{m}_vs_none_{clk}']:.3f})"
            cells.append(s)
        cells.append(f"{r['plain_{}'.format(clk)]:.2f}")
        cells.append(", ".join(f"{m}: {'ref' if ag.get('reference') else ('=' if ag.get('agree') else '!=')}"
                               for m, ag in r["agreement"].items()))
        rows.append(cells)
        for m, why in r.get("cannot", {}).items():
            notes.append(f"{t} cannot express {m}: {why}")
        for note in r.get("notes", []):
            notes.append(f"{t}: {note}")
    m0 = res["mars"]
    log(f"\n== steer: {n_p} prompts x {k} tokens, layer {layer} ({clk} clock) ==")
    log(fmt_table(rows, ["tool", "unsteered", "first token", "every token", "plain generate s", "tokens vs package"]))
    log("each cell: median seconds of one batched greedy generate and x its ratio to a plain HF model.generate of the "
        "same ids in the same process; in brackets steered / the tool's own unsteered generate")
    log(f"the edit changes {100 * m0.get('first_changes_tokens', 0):.0f}% (first) and "
        f"{100 * m0.get('every_changes_tokens', 0):.0f}% (every) of the generated tokens")
    for note in notes:
        log(f"  note: {note}")
    ok = True
    f_own = m0.get(f"first_vs_none_{clk}")
    good = f_own is not None and f_own <= STEER_TARGET
    ok &= good
    log(f"\ntarget: package first-token steered / its unsteered generate <= {STEER_TARGET} ({clk}): "
        f"{f_own:.3f}: {'PASS' if good else 'FAIL'}")
    peers_first = {t: res[t][f"first_ratio_{clk}"] for t in tools
                   if t != "mars" and f"first_ratio_{clk}" in res[t]}
    if peers_first:
        best = min(peers_first, key=peers_first.get)
        good = m0[f"first_ratio_{clk}"] <= peers_first[best]
        ok &= good
        log(f"target: package first-token steered generate (/ plain generate) no slower than any peer's ({clk}): "
            f"mars {m0[f'first_ratio_{clk}']:.3f} vs {best} {peers_first[best]:.3f}: {'PASS' if good else 'FAIL'}")
    (out_dir / "summary_steer.json").write_text(json.dumps({"rows": rows, "notes": notes, "ok": ok}, indent=1))
    return ok


if __name__ == "__main__":
    sys.exit(main())
