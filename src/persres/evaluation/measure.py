"""What a benchmark variant costs: peak memory during training and its result's size on disk.

On CUDA the peak is ``torch.cuda.max_memory_allocated`` (tensors only), reset before each training. On
the CPU it is the process's peak resident set size from ``getrusage``: the kernel keeps one maximum per
process and it cannot be reset, so it covers everything the process did before too (the models loaded,
the variants trained earlier); ``PEAK_SOURCES`` names which one a row holds.
"""

from __future__ import annotations

import resource
import sys
from pathlib import Path

import torch

PEAK_SOURCES = {"cuda": "cuda-max-allocated", "cpu": "process-peak-rss"}


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> tuple[int, str]:
    """The peak since ``reset_peak_memory`` (CUDA) or the process's peak RSS (CPU), in bytes, and its
    source."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), PEAK_SOURCES["cuda"]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    scale = 1 if sys.platform == "darwin" else 1024  # Linux reports KiB, macOS bytes
    return int(peak) * scale, PEAK_SOURCES["cpu"]


def size_on_disk(path: Path) -> int:
    """Bytes of a result: a file, or every file under a folder."""
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
