"""What the machine computes with (``parlay doctor`` and the first line of ``parlay train``)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from parlay.agents import hf_layer
from parlay.agents.machine import QUICKSTART, Reference, calibrate, describe, expected_minutes


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
    assert expected_minutes(100e9, None) is None  # no reference in this dtype


def test_each_dtype_auto_picks_has_a_reference_of_its_own():
    """A bf16 machine's time is scaled from a bf16 run, not from a float32 one: the job is not
    matmul-bound to the same degree in both (bf16 play is bound by attention)."""
    for dtype, ref in QUICKSTART.items():
        assert ref.dtype == dtype and ref.minutes > 0 and ref.gflops > 0
    assert {"float32", "bfloat16"} <= set(QUICKSTART)


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
    said = " ".join(done.stdout.split())  # however the console wrapped it
    if describe().gpu:  # the references are CPU runs
        assert "no estimate on a GPU" in said and "scaled from" not in said
    else:
        reference = QUICKSTART[str(describe().auto_dtype).removeprefix("torch.")]
        assert f"GFLOP/s {reference.dtype} ({reference.machine}, commit {reference.commit})" in said
    assert f"{cores + 2} threads on {cores} usable cores" in done.stderr.replace("\n", " ")
    assert f"OMP_NUM_THREADS={cores}" in done.stderr.replace("\n", " ")


def test_doctor_measures_and_estimates_the_dtype_asked_for():
    """``--dtype float32`` measures float32 and scales the float32 reference (the AVX2 class's path,
    estimated on any CPU); a dtype it does not know is an error naming the choices."""
    cmd = [sys.executable, "-m", "parlay", "doctor", "--seconds", "0.5", "--dtype", "float32"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    said = " ".join(done.stdout.split())
    assert "GFLOP/s in float32" in said
    if not describe().gpu:
        ref = QUICKSTART["float32"]
        assert f"GFLOP/s float32 ({ref.machine}, commit {ref.commit})" in said
    bad = subprocess.run([*cmd[:-1], "float8"], capture_output=True, text=True)
    assert bad.returncode != 0 and "unknown dtype 'float8'" in " ".join(bad.stderr.split())
    if not describe().gpu:
        emulated = subprocess.run([*cmd[:-1], "fp16"], capture_output=True, text=True)
        assert emulated.returncode != 0 and "float16 by emulation" in " ".join(emulated.stderr.split())
