"""Experiment tracking: TensorBoard event files read back, W&B in offline mode."""

import time

import pytest

from parlay.tracking import Tracker, TrackingError, flatten


def scalars(log_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_flatten_namespaces_numbers_and_drops_the_rest():
    data = {
        "loss": 0.5,
        "skipped": False,
        "rule": "all",
        "judge": {"pearson": 0.3, "spearman": None},
        "x": float("nan"),
    }
    assert flatten("train", data) == {"train/loss": 0.5, "train/skipped": 0.0, "train/judge/pearson": 0.3}


def test_tensorboard_gets_each_metric_on_its_own_axis(tmp_path):
    tracker = Tracker(["tensorboard"], tmp_path, "t")
    tracker.log({"rollout/mean_reward": 1.0, "eval/vs_round0": 0.0}, 0)
    tracker.log({"train/loss": 2.0}, 1, "train/step")
    tracker.log({"train/loss": 1.5}, 2, "train/step")
    tracker.log({"rollout/mean_reward": 3.0}, 1)
    tracker.close()
    got = scalars(tmp_path / "tensorboard")
    assert got["rollout/mean_reward"] == [(0, 1.0), (1, 3.0)]
    assert got["train/loss"] == [(1, 2.0), (2, 1.5)]


def test_wandb_offline_run_records_the_metrics(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    tracker = Tracker(["wandb"], tmp_path, "offline-test", {"objective": "cooperative"})
    tracker.log({"rollout/agreement_rate": 0.625}, 0)
    tracker.log({"train/loss": 0.375}, 1, "train/step")
    tracker.close()
    runs = list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1
    # W&B's own record format: the names and values are in it, written by W&B's service process,
    # which may still be flushing when finish() returns on a busy machine.
    wanted = (b"rollout/agreement_rate", b"0.625", b"train/loss")
    deadline = time.monotonic() + 60
    while not all(w in (data := runs[0].read_bytes()) for w in wanted) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert all(w in data for w in wanted), data[:200]
    run_id = (tmp_path / "wandb" / "run-id").read_text()
    assert runs[0].name == f"run-{run_id}.wandb"  # a resumed run reuses this id


def test_unknown_backend_is_refused():
    with pytest.raises(TrackingError, match="mlflow"):
        Tracker(["mlflow"], None, "t")
