"""Memory and CPU of a process tree, sampled while a benchmark configuration runs (Linux /proc).

Used by ``long_prompt_bench.py`` for each configuration: lorafleet's harness process, or vLLM's
three processes. RSS counts pages shared between processes once per process; PSS divides them.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
            kids.setdefault(ppid, []).append(int(entry))
    return kids


def process_tree(pid: int, exclude: frozenset[int] = frozenset()) -> list[int]:
    """``pid`` and all its descendants, without the subtrees rooted at ``exclude``."""
    kids, out = _children(), [pid]
    for p in out:
        out.extend(k for k in kids.get(p, []) if k not in exclude)
    return out


def tree_cpu_s(pid: int, exclude: frozenset[int] = frozenset()) -> float:
    """User + system CPU seconds of ``pid``'s tree (live processes)."""
    ticks = 0
    for p in process_tree(pid, exclude):
        try:
            stat = Path(f"/proc/{p}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def tree_memory_mb(pid: int, exclude: frozenset[int] = frozenset()) -> tuple[float, float]:
    """(RSS sum, PSS sum) in MiB over ``pid``'s tree."""
    rss = pss = 0
    for p in process_tree(pid, exclude):
        try:
            text = Path(f"/proc/{p}/smaps_rollup").read_text()
        except OSError:
            continue
        for line in text.splitlines():
            if line.startswith("Rss:"):
                rss += int(line.split()[1])
            elif line.startswith("Pss:"):
                pss += int(line.split()[1])
    return rss / 1024, pss / 1024


class MemorySampler:
    """Samples a process tree's memory every ``interval`` seconds in a thread; keeps the peaks."""

    def __init__(self, pid: int, exclude: frozenset[int] = frozenset(), interval: float = 0.25) -> None:
        self.pid, self.exclude, self.interval = pid, exclude, interval
        self.peak_rss_mb = self.peak_pss_mb = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        rss, pss = tree_memory_mb(self.pid, self.exclude)
        self.peak_rss_mb, self.peak_pss_mb = max(self.peak_rss_mb, rss), max(self.peak_pss_mb, pss)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> MemorySampler:
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()
