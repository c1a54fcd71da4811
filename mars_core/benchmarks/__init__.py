"""Benchmark and prompt-set loaders (local copies in their published layouts), one `Record` type."""

from .records import Record, records_to_promptset

__all__ = ["Record", "records_to_promptset"]

# Text prompt sets (AdvBench, HarmBench, JBB, StrongREJECT, Alpaca) and their splits/filters.
from .text_sets import (  # noqa: E402
    content_id,
    load_advbench,
    load_alpaca,
    load_harmbench,
    load_jailbreakbench,
    load_strongreject,
    load_text_set,
    TEXT_SETS,
)
from .text_splits import balanced_pair, dedupe, filter_by_refusal, normalise_text, split_records  # noqa: E402

__all__ += [
    "balanced_pair", "content_id", "dedupe", "filter_by_refusal", "load_advbench", "load_alpaca",
    "load_harmbench", "load_jailbreakbench", "load_strongreject", "load_text_set", "normalise_text", "split_records",
    "TEXT_SETS",
]

# Multimodal benchmarks (MM-SafetyBench, FigStep, VLGuard, JailBreakV-28K, MM-Vet, Video-SafetyBench),
# their registry, toy fixtures and media I/O (neutral sets for re-centering: mars_core.steering.neutral).
from .media import load_image, load_video, write_video  # noqa: E402
from .multimodal import (  # noqa: E402
    FIGSTEP_PROMPT,
    load_figstep,
    load_jailbreakv,
    load_mm_safetybench,
    load_mm_vet,
    load_video_safetybench,
    load_vlguard,
)
from .registry import BENCHMARKS, BenchmarkSpec, load_benchmark, register_benchmark  # noqa: E402
from .fixtures import write_fixture  # noqa: E402

__all__ += [
    "BENCHMARKS", "BenchmarkSpec", "FIGSTEP_PROMPT", "load_benchmark", "load_figstep", "load_image",
    "load_jailbreakv", "load_mm_safetybench", "load_mm_vet", "load_video", "load_video_safetybench", "load_vlguard",
    "register_benchmark",
    "write_fixture", "write_video",
]
