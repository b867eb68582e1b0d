"""What the machine computes with (``parlay doctor`` and the first line of ``parlay train``)."""

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from parlay.agents import hf_layer
from parlay.agents.machine import Reference, calibrate, describe, expected_minutes


def _cpuinfo_field(key: str) -> str | None:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return None
    return next((line.partition(":")[2].strip() for line in lines if line.partition(":")[0].strip() == key), None)


def test_the_machine_is_described_from_the_kernel_and_torch():
    machine = describe()
    if (name := _cpuinfo_field("model name")) is not None:
        assert machine.cpu == name
    flags = set((_cpuinfo_field("flags") or "").split())
    assert machine.native_bf16 == bool({"avx512_bf16", "amx_bf16"} & flags)
    assert machine.cores == len(os.sched_getaffinity(0)) or Path("/sys/fs/cgroup/cpu.max").exists()
    assert machine.threads == torch.get_num_threads()
    assert machine.auto_dtype == hf_layer.pick_dtype("auto", hf_layer.default_device())
    line = machine.summary()
    assert str(machine.auto_dtype).removeprefix("torch.") in line and f"{machine.threads} thread" in line


def test_more_threads_than_cores_is_named_with_the_setting_to_change():
    machine = describe()
    crowded = type(machine)(machine.cpu, machine.flags, cores=2, threads=8, gpu=None)
    (warning,) = crowded.warnings()
    assert "8 threads on 2 usable cores" in warning and "OMP_NUM_THREADS=2" in warning
    assert type(machine)(machine.cpu, machine.flags, cores=2, threads=2, gpu=None).warnings() == []


def test_the_expected_time_scales_the_reference_by_the_matmul_rates():
    ref = Reference(minutes=30.0, gflops=100.0, dtype="float32", machine="m", commit="c")
    assert expected_minutes(50e9, ref) == pytest.approx(60.0)  # half the rate, twice the time
    assert expected_minutes(200e9, ref) == pytest.approx(15.0)
    assert expected_minutes(100e9, Reference(0.0, 100.0, "float32", "m", "c")) is None  # nothing measured yet


def test_calibration_counts_two_flops_per_multiply_add():
    rate = calibrate(torch.float32, seconds=0.2, n=256)
    assert 1e6 < rate < 1e14  # FLOP/s, not GFLOP/s or per-call seconds


def test_doctor_says_what_train_will_use_and_warns_of_crowded_threads():
    """torch caps ``OMP_NUM_THREADS`` at the cores it sees, but not at a container's CPU quota, nor
    a thread count set in code: the doctor names the setting either way."""
    cores = describe().cores
    code = (
        f"import sys, torch; torch.set_num_threads({cores + 2}); from parlay.cli import run; "
        "sys.argv = ['parlay', 'doctor', '--seconds', '0.5']; run()"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "dtype auto = " in done.stdout and "GFLOP/s" in done.stdout
    assert f"{cores + 2} threads on {cores} usable cores" in done.stderr.replace("\n", " ")
    assert f"OMP_NUM_THREADS={cores}" in done.stderr.replace("\n", " ")


HEAP_SLACK = """
import sys, torch
from parlay.agents.machine import release_large_blocks
if sys.argv[1] == "release":
    assert release_large_blocks()
def rss_mib():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20
torch.ones(1 << 22)  # a 16 MiB block, freed at once: glibc's dynamic threshold rises above 4 MiB
big, small = [], []
for _ in range(64):
    big.append(torch.ones(1 << 20))  # 4 MiB, written (resident)
    small.append(torch.ones(1 << 16))  # 256 KiB after each, kept: activations sit among smaller tensors
before = rss_mib()
del big
print(before - rss_mib())
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="a glibc malloc setting")
def test_freed_activation_sized_blocks_go_back_to_the_system():
    """256 MiB of 4 MiB tensors, each followed by a kept 256 KiB one, then freed: under glibc's default
    (the threshold raised by an earlier free) they were carved from the heap and stay resident;
    after ``release_large_blocks`` each had its own mapping and RSS falls by about all of it."""

    def freed(mode: str) -> float:
        env = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"}
        done = subprocess.run([sys.executable, "-c", HEAP_SLACK, mode], capture_output=True, text=True, env=env)
        assert done.returncode == 0, done.stderr
        return float(done.stdout.split()[-1])

    assert freed("default") < 64  # the setup shows the slack: most of the 256 MiB stays resident
    assert freed("release") > 230
