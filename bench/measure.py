"""Measurement helpers shared by the benchmarks: peak memory of a command's process tree, and cold
sequential-read speed of files."""

from __future__ import annotations

import os
import subprocess
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _rss_anon(pid: int) -> int:
    """Anonymous resident bytes of a process (excludes mapped files, which the kernel can reclaim)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0


def run_with_peak_rss(cmd: list[str]) -> tuple[float, int, int, str]:
    """Wall seconds, peak summed RSS and RssAnon (bytes) of the command's process tree, and its output."""
    import psutil

    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak = peak_anon = 0
    stop = threading.Event()

    def sample():
        nonlocal peak, peak_anon
        while not stop.is_set():
            try:
                root = psutil.Process(proc.pid)
                tree = [root, *root.children(recursive=True)]
                peak = max(peak, sum(p.memory_info().rss for p in tree))
                peak_anon = max(peak_anon, sum(_rss_anon(p.pid) for p in tree))
            except (psutil.Error, OSError):
                pass
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    output, _ = proc.communicate()
    stop.set()
    sampler.join()
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{output[-3000:]}")
    return time.perf_counter() - start, peak, peak_anon, output


def evict_from_page_cache(paths: list[Path]) -> None:
    """Asks the kernel to drop the files' cached pages (no root needed), so the next read comes from disk."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def sequential_read_gbps(paths: list[Path], block: int = 16 << 20) -> tuple[float, int]:
    """Reads the files front to back, cold, into one reused buffer: (GB/s, bytes)."""
    evict_from_page_cache(paths)
    buffer = bytearray(block)
    total, start = 0, time.perf_counter()
    for path in paths:
        with open(path, "rb", buffering=0) as f:
            while n := f.readinto(buffer):
                total += n
    seconds = time.perf_counter() - start
    evict_from_page_cache(paths)
    return total / 1e9 / seconds, total


def copy_gbps(paths: list[Path], dest_dir: Path) -> float:
    """Cold copy of the files to `dest_dir`, fsynced, then deleted: the I/O floor of any converter that
    reads the files and writes as much (GB/s of source bytes)."""
    import shutil

    evict_from_page_cache(paths)
    dest_dir.mkdir(parents=True, exist_ok=True)
    total, start = 0, time.perf_counter()
    for path in paths:
        copy = dest_dir / path.name
        shutil.copyfile(path, copy)
        fd = os.open(copy, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
        total += path.stat().st_size
    seconds = time.perf_counter() - start
    shutil.rmtree(dest_dir)
    evict_from_page_cache(paths)
    return total / 1e9 / seconds
