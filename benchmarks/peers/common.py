"""Shared harness of the peer runners of benchmarks/peers.py (one process per tool).

Imports only torch, transformers and safetensors, so it runs in every peer's environment
(the package's venv with a --target folder first on sys.path, or a peer's own virtualenv).

A runner is called as

    python benchmarks/peers/run_<tool>.py JOB SPEC.json

where SPEC (written by peers.py) names the model folder, the batches file (identical
input_ids / attention_mask for every tool, built once by the package's runner with
`mm.build_batch`), the reference directions (the package's output) and the output JSON. The
runner defines the tool's job functions; `main` loads the model, computes the tool's output once
(which is also the warm-up), checks it against the reference, and only if it agrees times the
tool against a plain `output_hidden_states` forward of the same batches in the same process:
ABBA interleaved repetitions, both clocks (perf_counter, process_time), median of the
per-repetition ratios.
"""

from __future__ import annotations

import gc
import json
import os
import resource
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

AGREE_COS = 0.9999  # directions: cosine to the package's, per (layer, position)
HERE = Path(__file__).resolve().parent


def set_threads(n: int = 1) -> None:
    import torch

    torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass


def fmt_table(rows: list[list[str]], head: list[str]) -> str:
    """A plain-text table: the head, a rule, the rows, columns padded to their widest cell."""
    w = [max(len(str(r[i])) for r in rows + [head]) for i in range(len(head))]
    line = lambda r: "  ".join(str(c).ljust(w[i]) for i, c in enumerate(r)).rstrip()  # noqa: E731
    return "\n".join([line(head), "-" * (sum(w) + 2 * (len(w) - 1))] + [line(r) for r in rows])


# ------------------------------------------------------------------ memory
def status_kb(field: str = "VmRSS") -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(field)


def reset_hwm() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM); False where that is not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return status_kb("VmHWM") <= status_kb("VmRSS") + 256
    except OSError:
        return False


def measure_peak(fn: Callable[[], Any]) -> tuple[Any, dict]:
    """Run fn once; its result and {peak_above_kb: peak RSS during the call above the RSS before
    it (VmHWM reset first; None where it cannot be reset), rss_before_kb}."""
    gc.collect()
    ok = reset_hwm()
    before = status_kb()
    out = fn()
    peak = status_kb("VmHWM")
    return out, {"peak_above_kb": (peak - before) if ok else None, "rss_before_kb": before}


# ------------------------------------------------------------------ inputs
def load_spec(path: str) -> dict:
    return json.loads(Path(path).read_text())


def load_model(spec: dict):
    """(model, tokenizer) from the spec's model folder, float32, eval. spec["model_kind"]: "smol"
    (the converted SmolLM2, AutoModelForCausalLM + AutoTokenizer, left padding; the default) or
    "llava" (the random ~200M LlavaForConditionalGeneration peers.py saved, with its processor)."""
    import torch

    if spec.get("model_kind", "smol") == "llava":
        from transformers import AutoProcessor, LlavaForConditionalGeneration

        model = LlavaForConditionalGeneration.from_pretrained(spec["model_dir"], dtype=torch.float32,
                                                              local_files_only=True)
        try:
            return model.eval(), AutoProcessor.from_pretrained(spec["model_dir"], local_files_only=True)
        except (ImportError, ValueError):  # an env without Pillow/torchvision (nnterp, tlens): the
            from transformers import AutoTokenizer  # batches carry pixel_values, the tokenizer suffices

            return model.eval(), AutoTokenizer.from_pretrained(spec["model_dir"], local_files_only=True)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.float32, local_files_only=True)
    tok = AutoTokenizer.from_pretrained(spec["model_dir"], local_files_only=True)
    tok.padding_side = "left"
    return model.eval(), tok


def decoder_layers(model):
    """The language model's decoder layers (a ModuleList): `model.model.layers` (SmolLM2) or
    `model.model.language_model.layers` (LLaVA), with the module path for tools that take one."""
    inner = model.model
    if hasattr(inner, "language_model"):
        return inner.language_model.layers, "model.language_model.layers"
    return inner.layers, "model.layers"


def load_batches(spec: dict) -> dict:
    """{"harmful": [{"input_ids", "attention_mask"[, "pixel_values"]}...], "harmless": [...], "positions": (-k..-1),
    "rendered": {"harmful": [[str]...], ...}, "texts": {...}} as saved by the package's runner."""
    import torch

    return torch.load(spec["batches"], weights_only=True)


def plain_forward(model, batches: dict) -> Callable[[], None]:
    """The reference: a plain `output_hidden_states` forward of every batch (all its inputs: ids,
    mask and, for LLaVA, pixel_values), both sides."""
    import torch

    encs = [b for side in ("harmful", "harmless") for b in batches[side]]

    def plain():
        with torch.no_grad():
            for enc in encs:
                model(**enc, output_hidden_states=True)

    return plain


# ------------------------------------------------------------------ timing
def interleaved(fns: dict[str, Callable[[], Any]], reps: int, warmup: int = 0) -> dict:
    """ABBA-interleaved repetitions after `warmup` rounds: {name: {"wall": [...], "cpu": [...]}}."""
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n]()
    gc.collect()
    times = {n: {"wall": [], "cpu": []} for n in names}
    for r in range(reps):
        for n in names if r % 2 == 0 else names[::-1]:
            c0, t0 = time.process_time(), time.perf_counter()
            fns[n]()
            t1, c1 = time.perf_counter(), time.process_time()
            times[n]["wall"].append(t1 - t0)
            times[n]["cpu"].append(c1 - c0)
    return times


def summarize(times: dict, tool: str, ref: str = "plain") -> dict:
    out = {}
    for clk in ("wall", "cpu"):
        out[f"{tool}_{clk}"] = statistics.median(times[tool][clk])
        out[f"{ref}_{clk}"] = statistics.median(times[ref][clk])
        out[f"ratio_{clk}"] = statistics.median(a / b for a, b in zip(times[tool][clk], times[ref][clk]))
    return out


# ------------------------------------------------------------------ directions
def save_directions(path: str | Path, mean_diff, layers, positions) -> None:
    import torch
    from safetensors.torch import save_file

    save_file({"mean_diff": mean_diff.to(torch.float64).contiguous(),
               "layers": torch.tensor(list(layers), dtype=torch.int64),
               "positions": torch.tensor(list(positions), dtype=torch.int64)}, str(path))


def load_directions(path: str | Path):
    from safetensors.torch import load_file

    t = load_file(str(path))
    return t["mean_diff"], t["layers"].tolist(), t["positions"].tolist()


def agreement(mean_diff, layers, positions, ref_path: str | Path) -> dict:
    """Cosine to the reference direction at every (layer, position) both have."""
    import torch

    ref, rl, rp = load_directions(ref_path)
    cos = {}
    for i, layer in enumerate(layers):
        if layer not in rl:
            continue
        for j, p in enumerate(positions):
            if p not in rp:
                continue
            a = mean_diff[i, j].to(torch.float64)
            b = ref[rl.index(layer), rp.index(p)]
            cos[(layer, p)] = float(torch.nn.functional.cosine_similarity(a, b, dim=0))
    if not cos:
        return {"compared": 0, "min_cos": None, "agree": False}
    worst = min(cos, key=cos.get)
    return {"compared": len(cos), "min_cos": cos[worst], "worst_at": list(worst),
            "layers_compared": sorted({k[0] for k in cos}), "positions_compared": sorted({k[1] for k in cos}),
            "agree": cos[worst] >= AGREE_COS}


def mean_diff_from_sums(sum_h, n_h, sum_s, n_s):
    return sum_h / n_h - sum_s / n_s


# ------------------------------------------------------------------ runner entry
def run_extract(tool: str, prepare: Callable[[dict, Any, Any, dict], dict], spec_path: str) -> int:
    """Job extract for one tool.

    prepare(spec, model, tok, batches) -> {"extract": fn() -> (mean_diff [L, P, D], layers,
    positions), "plain_model": a model for the plain forward (not instrumented by the tool),
    "notes": [...], "versions": {...}}.
    """
    set_threads(int(os.environ.get("PEERS_THREADS", "1")))
    spec = load_spec(spec_path)
    out: dict[str, Any] = {"tool": tool, "job": "extract", "python": sys.executable}
    try:
        import torch
        import transformers

        out["versions"] = {"torch": torch.__version__, "transformers": transformers.__version__}
        t0 = time.perf_counter()
        model, tok = load_model(spec)
        batches = load_batches(spec)
        setup = prepare(spec, model, tok, batches)
        out["versions"].update(setup.get("versions", {}))
        out["notes"] = setup.get("notes", [])
        out["load_s"] = time.perf_counter() - t0
        extract = setup["extract"]
        plain = plain_forward(setup["plain_model"], batches)
        # the output, from the first call (also the tool's warm-up), with its peak memory
        (md, layers, positions), mem = measure_peak(extract)
        out.update(mem)
        out["shape"] = list(md.shape)
        out["layers"], out["positions"] = list(layers), list(positions)
        dpath = Path(spec["out_dir"]) / f"extract_{tool}.safetensors"
        save_directions(dpath, md, layers, positions)
        out["directions"] = str(dpath)
        if spec.get("reference") and Path(spec["reference"]).resolve() != dpath.resolve():
            out["agreement"] = agreement(md, layers, positions, spec["reference"])
        else:
            out["agreement"] = {"reference": True, "agree": True, "min_cos": 1.0, "compared": md.shape[0] * md.shape[1]}
        if out["agreement"]["agree"] or spec.get("time_disagreeing"):
            plain()  # warm-up of the reference
            times = interleaved({"tool": extract, "plain": plain}, int(spec["reps"]))
            out["times"] = times
            out.update(summarize(times, "tool"))
            for name, fn in (setup.get("extra", {}) if spec.get("diagnose") else {}).items():  # information rows, same process
                t2 = interleaved({"tool": fn, "plain": plain}, int(spec["reps"]), warmup=1)
                out.setdefault("extra", {})[name] = summarize(t2, "tool")
        out["ru_maxrss_kb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        out["status"] = "ok"
    except Exception as e:  # a peer that cannot run is reported with the reason
        out["status"] = "error"
        out["error"] = f"{type(e).__name__}: {e}"
        out["traceback"] = traceback.format_exc()[-4000:]
    Path(spec["out_dir"], f"extract_{tool}.json").write_text(json.dumps(out, indent=1, default=str))
    print(json.dumps({k: out.get(k) for k in ("tool", "status", "error", "ratio_cpu")}), flush=True)
    return 0 if out["status"] == "ok" else 1


# ------------------------------------------------------------------ job steer
STEER_MODES = ("none", "first", "every")


def run_steer(tool: str, prepare: Callable[[dict, Any, Any, dict], dict], spec_path: str) -> int:
    """Job steer for one tool: greedy generation of the steer batch, unsteered ("none"), with the
    fixed vector added at one layer at the last prompt position at prefill only ("first": the
    first generated token), and at that position and every generated position ("every").

    prepare(spec, model, tok, steer) -> {"gen": fn(mode) -> new token ids [batch, k],
    "cannot": {mode: reason}, "plain_model": model for the plain HF generate, "notes", "versions"}.
    Agreement before timing: each mode's tokens equal the package's; then the tool's modes and a
    plain `model.generate` are timed interleaved (ratios: each mode / plain, steered / the tool's
    own unsteered).
    """
    set_threads(int(os.environ.get("PEERS_THREADS", "1")))
    spec = load_spec(spec_path)
    out: dict[str, Any] = {"tool": tool, "job": "steer", "python": sys.executable}
    try:
        import torch
        import transformers

        out["versions"] = {"torch": torch.__version__, "transformers": transformers.__version__}
        model, tok = load_model(spec)
        steer = torch.load(spec["steer"], weights_only=True)
        setup = prepare(spec, model, tok, steer)
        out["versions"].update(setup.get("versions", {}))
        out["notes"] = setup.get("notes", [])
        out["cannot"] = setup.get("cannot", {})
        k = int(steer["max_new_tokens"])
        enc = steer["enc"]
        pm = setup["plain_model"]

        def plain():
            with torch.no_grad():
                pm.generate(**enc, max_new_tokens=k, min_new_tokens=k, do_sample=False,
                            pad_token_id=tok.pad_token_id)

        modes = [m for m in STEER_MODES if m not in out["cannot"]]
        ids, agree = {}, {}
        ref = Path(spec["out_dir"]) / "steer_mars_ids.pt"
        refs = torch.load(ref, weights_only=True) if ref.is_file() and tool != "mars" else None
        for m in modes:
            ids[m] = setup["gen"](m).cpu()
            if refs is None:
                agree[m] = {"reference": True, "agree": True}
            else:
                r = refs[m]
                same = r.shape == ids[m].shape and bool((r == ids[m]).all())
                frac = float((r == ids[m]).float().mean()) if r.shape == ids[m].shape else 0.0
                agree[m] = {"agree": same, "token_match": frac}
        if tool == "mars":
            torch.save(ids, ref)
        out["agreement"] = agree
        if "none" in ids and "first" in ids:
            out["first_changes_tokens"] = float((ids["none"] != ids["first"]).float().mean())
        if "none" in ids and "every" in ids:
            out["every_changes_tokens"] = float((ids["none"] != ids["every"]).float().mean())
        fns = {"plain": plain}
        for m in modes:
            if agree[m]["agree"]:
                fns[m] = (lambda m=m: setup["gen"](m))
        plain()
        times = interleaved(fns, int(spec["reps"]))
        out["times"] = times
        for m in fns:
            for clk in ("wall", "cpu"):
                out[f"{m}_{clk}"] = statistics.median(times[m][clk])
                out[f"{m}_ratio_{clk}"] = statistics.median(a / b for a, b in zip(times[m][clk], times["plain"][clk]))
                if m in ("first", "every") and "none" in fns:
                    out[f"{m}_vs_none_{clk}"] = statistics.median(
                        a / b for a, b in zip(times[m][clk], times["none"][clk]))
        out["ru_maxrss_kb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        out["status"] = "ok"
    except Exception as e:
        out["status"] = "error"
        out["error"] = f"{type(e).__name__}: {e}"
        out["traceback"] = traceback.format_exc()[-4000:]
    Path(spec["out_dir"], f"steer_{tool}.json").write_text(json.dumps(out, indent=1, default=str))
    print(json.dumps({k: out.get(k) for k in ("tool", "status", "error")}), flush=True)
    return 0 if out["status"] == "ok" else 1


def main(tool: str, jobs: dict[str, Callable]) -> int:
    """`python run_<tool>.py JOB SPEC`: run the job the runner defines, or report it cannot."""
    job, spec = sys.argv[1], sys.argv[2]
    if job not in jobs:
        s = load_spec(spec)
        msg = {"tool": tool, "job": job, "status": "error", "error": f"job {job} is not implemented for {tool}"}
        Path(s["out_dir"], f"{job}_{tool}.json").write_text(json.dumps(msg))
        return 1
    runner = run_extract if job == "extract" else run_steer
    return runner(tool, jobs[job], spec)
