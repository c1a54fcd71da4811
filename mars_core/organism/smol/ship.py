"""Package trained runs as shipped weights: ``weights/seed<k>/`` (only what the project trained).

    python -m mars_core.organism.smol.ship --run runs/smol/seed0 --seed 0

Copies ``RUN/stage_c/organism.safetensors`` (LoRA factors of stages a and c, vision tower,
projector, the ``<image>`` embedding row), its config / generation config / processor config and
provenance, and the run's ``train_log.json``. Tokenizer files are not shipped: the tokenizer is
SmolLM2's plus ``<image>``, rebuilt from the base at load time (:func:`.build.build_tokenizer`).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from ...provenance import atomic_write_json, sha256_bytes
from .load import WEIGHTS

SHIP = ("organism.safetensors", "config.json", "generation_config.json", "processor_config.json",
        "chat_template.jinja", "provenance.json")


def ship(run, seed: int, dst_root=WEIGHTS) -> Path:
    run = Path(run)
    src = run / "stage_c"
    dst = Path(dst_root) / f"seed{seed}"
    tmp = Path(dst_root) / f".seed{seed}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    for f in SHIP:
        if (src / f).is_file():
            shutil.copy2(src / f, tmp / f)
    log = json.loads((run / "train_log.json").read_text())
    atomic_write_json(tmp / "train_log.json", log)
    atomic_write_json(tmp / "files.json", {f: sha256_bytes((tmp / f).read_bytes()) for f in SHIP if (tmp / f).is_file()})
    if dst.exists():
        shutil.rmtree(dst)
    tmp.rename(dst)
    return dst


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", required=True)
    ap.add_argument("--seed", type=int, required=True)
    a = ap.parse_args(argv)
    d = ship(a.run, a.seed)
    size = sum(p.stat().st_size for p in d.iterdir())
    print(f"shipped {d} ({size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
