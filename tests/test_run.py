"""The run directory's records: written, read back, converted from version 1, and refused when unreadable."""

import json

import pytest

from parlay.run import ModelRef, RoundRecord, RunDir, RunDirError, SelectionInfo, TrainInfo


def test_a_record_reads_back_as_written(tmp_path):
    run = RunDir(tmp_path)
    info = TrainInfo(
        selection=SelectionInfo(player_episodes=8, rule="all", passed_filter=8, kept=6),
        trained=True,
        model=ModelRef(base="m", adapter=str(run.round(1).model)),
    )
    for k in (0, 1):
        record = RoundRecord(
            round=k, model=info.model, metrics={"mean_reward": k}, train=info if k else None, minutes=1
        )
        records = run.write_record(record)
    assert run.complete_rounds() == [0, 1] and records == run.records()
    assert [json.loads(line)["round"] for line in run.metrics_file.read_text().splitlines()] == [0, 1]
    run.round(1).write_train_info(info)
    assert run.round(1).train_info(ModelRef(base="ignored")) == info


def test_version_1_training_figures_are_converted(tmp_path):
    """A train_stats.json as the first version wrote it (a kill after training, before the round's
    metrics): the model it made is derived as that version did."""
    stage = RunDir(tmp_path).round(2)
    stage.path.mkdir(parents=True)
    flat = {"player_episodes": 8, "filter_rule": "nonzero", "passed_filter": 5, "kept": 5, "skipped": False}
    flat |= {"examples": 5, "skipped_examples": 0, "truncated_examples": 0, "steps": 3, "tokens": 100}
    flat |= {"own_tokens": 20, "loss_first": 1.0, "loss_last": 0.5, "nll_first": 1.0, "nll_last": 0.5}
    flat |= {"seconds": 2.0, "tokens_per_second": 50.0, "mean_iw": None, "losses": [1.0, 0.7, 0.5]}
    stage.train_info_file.write_text(json.dumps(flat))
    start = ModelRef(base="smollm2-135m", adapter="runs/x/rounds/1/model")
    info = stage.train_info(start, lora=True)
    assert info.trained and info.stats.steps == 3 and info.selection.rule == "nonzero"
    assert info.model == ModelRef(base="smollm2-135m", adapter=str(stage.model))
    stage.train_info_file.write_text(json.dumps({"player_episodes": 8, "filter_rule": "all", "passed_filter": 0,
                                                 "kept": 0, "skipped": True}))  # fmt: skip
    assert stage.train_info(start).model == start and not stage.train_info(start).trained


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{not json", "cannot be read"),
        ("[1, 2]", "expected a JSON object"),
        (json.dumps({"schema_version": 2, "round": 0}), "field 'model'"),
        (json.dumps({"schema_version": 9, "round": 0}), "written by a newer parlay"),
    ],
)
def test_unreadable_records_are_named(tmp_path, text, message):
    stage = RunDir(tmp_path).round(0)
    stage.path.mkdir(parents=True)
    stage.record_file.write_text(text)
    with pytest.raises(RunDirError, match=message):
        stage.record()
