"""CPU thread counts from the cores idle now: OMP_NUM_THREADS wins; else one thread per idle core, at least one."""

from __future__ import annotations

import os

import pytest

from ldm_finetune.core import threads


def test_omp_num_threads_wins(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert threads.cpu_threads() == 3


@pytest.mark.parametrize("idle_share, expected", [(1.0, 2), (0.85, 2), (0.5, 1), (0.1, 1), (0.0, 1)])
def test_one_thread_per_idle_core(monkeypatch, idle_share, expected):
    """/proc/stat read twice: (idle, total) jiffies; the share idle between the readings decides."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    readings = iter([(1000, 5000), (1000 + int(200 * idle_share), 5200)])
    monkeypatch.setattr(threads, "_cpu_times", lambda: next(readings))
    assert threads.cpu_threads() == expected


def test_the_real_proc_stat_reads_as_a_share_of_the_cores():
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert 0 <= threads.free_cores(0.05) <= cores
