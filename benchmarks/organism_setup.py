"""Shared setup of the benchmarks on the SmolLM2 organism (fit_sweeps.py, select_sweep.py): the
run header, the organism (`organism:smol`, seed 0) on one torch thread, its default prompt suite
and the text refusal directions from 64 + 64 training prompts."""

from __future__ import annotations

import datetime
import os


def header(name: str) -> None:
    """Print the run's name, time, versions, cpu count and load average."""
    import torch

    import mars_core

    print(f"{name} {datetime.datetime.now().isoformat(timespec='seconds')}: mars_core {mars_core.__version__}, "
          f"torch {torch.__version__}, {os.cpu_count()} cpus, load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)


def smol_setup(name: str):
    """(mm, suite, directions): header, the organism, `default_suite("organism:smol", mm, 0)`, and
    `RefusalDirections` at every layer and post-instruction position from 64 + 64 training prompts."""
    import torch

    from analysis.models import open_organism
    from analysis.reproduce import cap, default_suite
    from mars_core.directions import RefusalDirections

    torch.set_num_threads(1)
    header(name)
    mm, _ = open_organism("smol")
    s = default_suite("organism:smol", mm, 0)
    dirs = RefusalDirections.extract(mm, cap(s["harmful_text_train"], 64).texts, cap(s["harmless_text_train"], 64).texts,
                                     batch_size=32, progress=False)
    return mm, s, dirs
