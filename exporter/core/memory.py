"""Memory a whole-model stage is about to need, checked before it loads anything.

A stage the kernel's OOM killer stops at its peak leaves no status, no line and no reason: exit 137 after minutes
of work. The stages that hold a whole model in this process (the torch export, the traced quantize) estimate their
peak from the bytes they are about to load, with factors measured at R1-Distill-Qwen-1.5B's shape
(docs/benchmarks.md, "Real sizes"), and refuse with one line when the machine — or the container's memory limit —
has less available. The estimate is a measurement carried forward, not a bound: a stage's config can turn the
check off (`--no-memory-check`) to run anyway.

The streaming builder (`stream-build`, `quantize --graph fused`) holds one layer at a time and is never checked.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .errors import StageFailed

GIB = 1 << 30
# Peak RSS per byte loaded, measured at the 1.5B shape (6.6 GiB of FP32 weights), docs/benchmarks.md:
EXPORT_PEAK_PER_FP32_BYTE = 2.1  # torch export + ONNX Runtime verification: 1.63x (under load) .. 2.10x (quiet)
QUANTIZE_FP16_PEAK_PER_FP32_BYTE = 2.5  # 2.47x
QUANTIZE_INT4_PEAK_PER_FP32_BYTE = 2.8  # killed at the 18 GiB limit at 2.73x: the peak is at least that
FIXED_BYTES = GIB // 2  # torch / ONNX Runtime imports and allocator slack (~0.5 GiB, the 122M figures)


@dataclass(frozen=True)
class MemoryNeed:
    """What a stage is about to hold: `need` bytes at its peak, estimated from `loaded` bytes."""

    what: str
    loaded: int
    need: int

    @classmethod
    def of(cls, what: str, loaded: int, peak_per_byte: float) -> MemoryNeed:
        return cls(what, loaded, int(loaded * peak_per_byte) + FIXED_BYTES)


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # cgroup v2 writes "max" for no limit


def _stat(path: Path, key: str) -> int:
    try:
        for line in path.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key and value.strip().isdigit():
                return int(value)
    except OSError:
        pass
    return 0


def cgroup_available(root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """Bytes left under this process's cgroup memory limit (v2, else v1), counting reclaimable page cache as free;
    None when there is no limit. Only the cgroup mounted at `root` is read: the one a container sees as its own."""
    if (root / "memory.max").is_file():  # v2
        limit, usage = _read_int(root / "memory.max"), _read_int(root / "memory.current")
        cache = _stat(root / "memory.stat", "inactive_file")
    else:  # v1
        v1 = root / "memory"
        limit, usage = _read_int(v1 / "memory.limit_in_bytes"), _read_int(v1 / "memory.usage_in_bytes")
        cache = _stat(v1 / "memory.stat", "total_inactive_file")
    if limit is None or usage is None or limit >= 1 << 60:  # v1 writes a page-rounded 2^63 for no limit
        return None
    return max(0, limit - max(0, usage - cache))


def _meminfo_available(meminfo: Path) -> int | None:
    """The kernel's MemAvailable ("MemAvailable:   24085480 kB") in bytes."""
    try:
        for line in meminfo.read_text().splitlines():
            fields = line.split()
            if fields[:1] == ["MemAvailable:"] and len(fields) >= 2 and fields[1].isdigit():
                return int(fields[1]) * 1024
    except OSError:
        pass
    return None


def available_bytes(meminfo: Path = Path("/proc/meminfo"), cgroup_root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """What this process can still allocate: the kernel's MemAvailable, capped by the cgroup limit; None when
    neither can be read (not Linux)."""
    candidates = [v for v in (_meminfo_available(meminfo), cgroup_available(cgroup_root)) if v is not None]
    return min(candidates) if candidates else None


def require(need: MemoryNeed, alternative: str, *, enabled: bool = True) -> None:
    """Refuse (StageFailed, exit 1) before loading when `need` exceeds what is available; `alternative` says what
    to do instead. Unknown availability (not Linux) never refuses."""
    if not enabled or os.environ.get("R1DEPLOY_NO_MEMORY_CHECK") == "1":
        return
    available = available_bytes()
    if available is None or need.need <= available:
        return
    raise StageFailed(
        f"{need.what} needs about {need.need / GIB:.1f} GiB at its peak ({need.loaded / GIB:.1f} GiB loaded), and this "
        f"machine has {available / GIB:.1f} GiB available: not started (it would be killed by the kernel). "
        f"{alternative}; to try anyway: --no-memory-check (R1DEPLOY_NO_MEMORY_CHECK=1 where another command runs "
        "this stage)"
    )
