"""CPU thread counts that hold when the machine is shared.

torch starts one thread per core. On a small machine with another busy process that oversubscribes the cores:
measured on 2 cores beside one busy neighbour, the demo's LoRA stage ran at ~10 s/step with two threads where an
idle run takes 0.3 s, and two threads ran ~5x slower than one. The cost swings with how busy the cores are, so the
count is chosen from how busy they are *now*: the idle share of every core over a short window (/proc/stat), not
the load average, which lags a minute behind (it still counts the training run that just ended).

An explicit OMP_NUM_THREADS always wins (accelerate sets it for the processes it launches).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

PROC_STAT = Path("/proc/stat")


def _cpu_times() -> tuple[int, int] | None:
    """(idle, total) jiffies over all cores, or None where /proc/stat does not exist (not Linux)."""
    try:
        fields = [int(x) for x in PROC_STAT.read_text().splitlines()[0].split()[1:]]
    except (OSError, ValueError, IndexError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return idle, sum(fields[:8])


def free_cores(window_s: float = 0.25) -> float:
    """How many cores sat idle over the last `window_s` seconds (all of them where this cannot be measured)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    before = _cpu_times()
    if before is None:
        return float(cores)
    time.sleep(window_s)
    after = _cpu_times()
    total = after[1] - before[1]
    if total <= 0:
        return float(cores)
    share = (after[0] - before[0]) / total
    return cores * min(1.0, max(0.0, share))


def cpu_threads() -> int:
    """Threads for this process's torch work: OMP_NUM_THREADS when set, else the cores idle now (at least one)."""
    explicit = os.environ.get("OMP_NUM_THREADS", "").strip()
    if explicit.isdigit() and int(explicit) > 0:
        return int(explicit)
    # a core counts as free when it is mostly idle: 1.6 idle cores of 2 (background noise) still means two
    return max(1, int(free_cores() + 0.4))


def use_cpu_threads() -> int:
    """Set torch's intra-op threads to `cpu_threads()`; returns the count."""
    import torch

    threads = cpu_threads()
    torch.set_num_threads(threads)
    return threads
