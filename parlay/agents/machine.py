"""What this machine computes with, and what the main job should cost on it.

The quickstart's time depends above all on one fact: whether the CPU computes bf16 natively
(AVX512-BF16 or AMX). Where it does, ``dtype: auto`` trains and plays in bf16; where it does not
(AVX2-only CPUs: most laptops, many cloud machines), bf16 is a slow emulation and ``auto`` picks
float32, which costs more (play 1.65× slower in bench/RESULTS.md). ``describe`` gathers the facts
(CPU model, instruction sets, usable cores, torch's threads, the dtype ``auto`` picks) and
``calibrate`` measures the matmul rate in that dtype for a few seconds; ``expected_minutes`` scales
the main job's measured time on a reference machine of the same dtype by the ratio of the two
rates (a first-order estimate: the bulk of training and play is matmuls, bench/RESULTS.md).
"""

from __future__ import annotations

import functools
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class Reference:
    """The main job (``configs/cpu-quickstart.yaml``) as measured end to end on one machine."""

    minutes: float
    gflops: float
    """Matmul rate of that machine in the dtype the job ran in, by ``calibrate``, GFLOP/s."""
    dtype: str
    machine: str
    commit: str


QUICKSTART = {
    ref.dtype: ref
    for ref in (
        Reference(19.0, 177.0, "float32", "AMD EPYC, AVX-512+AVX512-BF16, 2 cores, float32 forced", "b761cf2"),
        Reference(12.5, 409.0, "bfloat16", "AMD EPYC, AVX-512+AVX512-BF16, 2 cores", "fe7570c"),
    )
}
"""The README's main job as last measured end to end with nothing else running (docs/RESULTS.md),
per dtype ``auto`` picks: a machine's time is scaled from the reference of its own dtype, since
the job is not matmul-bound to the same degree in both (in bf16, play is half the job and its
attention is not a matmul). float32: seed 0 of ``parlay train`` with ``--set rollout.dtype=float32
--set train.dtype=float32`` on a machine with AVX512-BF16 (the path an AVX2-only CPU runs, on the
code of 2026-12-01 night), 177 GFLOP/s in float32 by ``parlay doctor --dtype float32`` (the median
of three calibrations after the run: 171-180). The one float32 run on an AVX2 machine (30.0 min at
130-141 GFLOP/s, commit 36521b7) predates the decoder's and trainer's later changes: scaled from
it, this machine's estimate was 23 min against the 19.0 measured. So an AVX2 machine's estimate is
scaled from another class's run: its non-matmul work may scale worse than its matmul rate.
bfloat16: seed 0 of ``parlay train`` on the same machine (the install and the model's conversion
not counted), 409 GFLOP/s (the median of three calibrations after the run: 387-413), the same
night. Read the estimate as rough."""


@dataclass(frozen=True)
class Machine:
    cpu: str
    flags: frozenset[str]
    cores: int
    """Cores this process may run on (its affinity, within a cgroup CPU quota if one is set)."""
    threads: int
    """Threads torch's CPU kernels use (``torch.get_num_threads``; ``OMP_NUM_THREADS`` sets it)."""
    gpu: str | None

    @property
    def native_bf16(self) -> bool:
        return has_native_bf16(self.flags)

    @property
    def auto_dtype(self) -> torch.dtype:
        """What ``dtype: auto`` picks here (``hf_layer.pick_dtype``)."""
        from parlay.agents.hf_layer import pick_dtype

        return pick_dtype("auto", "cuda" if self.gpu else "cpu")

    def summary(self) -> str:
        """One line: ``AMD EPYC, AVX2+FMA, no native bf16: dtype auto = float32; 2 threads on 2 cores``."""
        sets = "+".join(name for flag, name in _SETS if flag in self.flags) or "no AVX"
        bf16 = "native bf16" if self.native_bf16 else "no native bf16"
        where = f"GPU {self.gpu}" if self.gpu else f"{self.cpu}, {sets}, {bf16}"
        dtype = str(self.auto_dtype).removeprefix("torch.")
        threads = f"{self.threads} thread{'s' if self.threads != 1 else ''}"
        return f"{where}: dtype auto = {dtype}; {threads} on {self.cores} core{'s' if self.cores != 1 else ''}"

    def warnings(self) -> list[str]:
        """What will make a run slower than it need be, each naming the setting to change."""
        out = []
        if self.threads > self.cores:
            out.append(
                f"torch uses {self.threads} threads on {self.cores} usable cores: threads wait on each other; "
                f"set OMP_NUM_THREADS={self.cores}"
            )
        return out


_SETS = (("avx2", "AVX2"), ("fma", "FMA"), ("avx512f", "AVX-512"), ("avx512_bf16", "AVX512-BF16"), ("amx_bf16", "AMX"))


def has_native_bf16(flags: frozenset[str]) -> bool:
    """Whether CPU ``flags`` (``/proc/cpuinfo``'s) include native bf16 arithmetic."""
    return "avx512_bf16" in flags or "amx_bf16" in flags


def cpu_flags() -> frozenset[str]:
    return _cpuinfo()[1]


@functools.cache
def _cpuinfo() -> tuple[str, frozenset[str]]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine(), frozenset()
    name, flags = platform.machine(), frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and name == platform.machine():
            name = value.strip()
        elif key.strip() == "flags" and not flags:
            flags = frozenset(value.split())
    return name, flags


def usable_cores() -> int:
    """Cores this process may use: its CPU affinity, capped by a cgroup v2 quota (containers)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if quota != "max":
            cores = min(cores, max(1, int(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return cores


def describe() -> Machine:
    cpu, flags = _cpuinfo()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return Machine(cpu=cpu, flags=flags, cores=usable_cores(), threads=torch.get_num_threads(), gpu=gpu)


def calibrate(dtype: torch.dtype, seconds: float = 10.0, n: int = 2048) -> float:
    """The best rate of an ``n``×``n`` matmul in ``dtype`` over about ``seconds``, in FLOP/s.

    On a CPU, bf16 without native support measures its emulation (a fraction of a GFLOP/s),
    which is why ``auto`` avoids it there."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    best, deadline = float("inf"), time.perf_counter() + seconds
    torch.matmul(a, b)  # warm-up: the kernel's first call allocates
    while True:
        t = time.perf_counter()
        torch.matmul(a, b)
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
        if time.perf_counter() > deadline:
            return 2 * n**3 / best


def peak_rss_gb() -> float | None:
    """The most resident memory this process has held so far, in GB (2**30 bytes); None where
    the OS does not say (``resource`` is POSIX-only; Linux counts kB, macOS bytes)."""
    try:
        import resource
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**30 if platform.system() == "Darwin" else peak / 2**20


def expected_minutes(flops: float, reference: Reference | None) -> float | None:
    """The main job's expected wall time here, in minutes: the reference time scaled by the
    reference's matmul rate over ``flops`` (this machine's, in the dtype ``auto`` picks; the
    reference is ``QUICKSTART``'s of that dtype). None while no reference measurement is
    recorded (``reference`` None, or no minutes)."""
    if reference is None or reference.minutes <= 0 or flops <= 0:
        return None
    return reference.minutes * reference.gflops * 1e9 / flops
