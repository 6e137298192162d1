"""Latency as a ratio against a baseline measured in the same run.

Calls are interleaved (the order rotates every repeat), each cell is a
median, and the thread count is fixed, so load from other processes falls on
both sides of a ratio.
"""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


def device_info() -> dict[str, Any]:
    """CPU / GPU model, core counts, library versions and the date."""
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover
        usable = os.cpu_count() or 0
    try:
        import transformers

        tf = transformers.__version__
    except ImportError:  # pragma: no cover
        tf = None
    return {
        "cpu_model": cpu,
        "cpu_count": os.cpu_count(),
        "usable_cores": usable,
        "threads": torch.get_num_threads(),
        "isa": torch.backends.cpu.get_cpu_capability(),  # the vector instruction set in use
        "machine": platform.machine(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "transformers": tf,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def time_interleaved(fns: dict[str, Callable[[], Any]], repeats: int = 20,
                     warmup: int = 3) -> dict[str, float]:
    """Median seconds per call of each function, calls interleaved, order rotating."""
    samples = interleaved_samples(fns, repeats, warmup)
    return {n: statistics.median(v) for n, v in samples.items()}


def paired_speedup(samples: dict[str, list[float]], base: str, name: str) -> float:
    """Median over rounds of ``base`` time / ``name`` time, each pair from the same round
    of :func:`interleaved_samples`: steadier than the ratio of medians when the machine's
    speed drifts between rounds."""
    return statistics.median(b / x for b, x in zip(samples[base], samples[name]))


def interleaved_samples(fns: dict[str, Callable[[], Any]], repeats: int = 20,
                        warmup: int = 3) -> dict[str, list[float]]:
    """Seconds of each call of each function, per round: calls interleaved, order
    rotating."""
    names = list(fns)
    sync = _device_sync()
    with torch.no_grad():
        for _ in range(warmup):
            for n in names:
                fns[n]()
        samples: dict[str, list[float]] = {n: [] for n in names}
        for r in range(repeats):
            order = names[r % len(names):] + names[:r % len(names)]
            for n in order:
                sync()
                t0 = time.perf_counter()
                fns[n]()
                sync()
                samples[n].append(time.perf_counter() - t0)
    return samples


def _device_sync() -> Callable[[], None]:
    """``torch.cuda.synchronize`` once CUDA is in use (its work is asynchronous: a
    call's time is only known when its kernels have finished), else a no-op."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.synchronize
    return lambda: None


def _status_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def peak_rss_during(fn: Callable[[], Any]) -> int | None:
    """Bytes by which the process's resident set peaked above its size before ``fn()``:
    Linux's high-water mark (``VmHWM``), reset first through ``/proc/self/clear_refs``,
    after handing freed heap back to the system (glibc's ``malloc_trim``). None where
    that is not available."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return None
    before = _status_kb("VmRSS")
    fn()
    peak = _status_kb("VmHWM")
    if before is None or peak is None:
        return None
    return max(peak - before, 0) * 1024
