"""``parlay export``: training examples written for other tools.

The examples come from ``examples.select_examples`` — the same path a round trains on — over
one set of games at a time (a file, or one round of a run). Formats:

- ``train``: ``TrainExample`` lines, exactly as a round's ``train.jsonl``;
- ``openai``: OpenAI chat fine-tuning JSONL (``openai_ft.export``: weights become copies);
- ``jsonl``: one row per example with its reward, raw score, deal, context key, weight and meta;
- ``hf``: the same rows as a ``datasets.Dataset`` folder (``datasets.load_from_disk``).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_args

from parlay.config import ConfigError, FilterConfig, FilterRule, RunConfig, WeightConfig
from parlay.episode import EpisodeFileError, read_episodes, write_lines_atomic
from parlay.improve.examples import Selected, select_examples, write_examples
from parlay.improve.openai_ft import export as export_openai
from parlay.run import RunDir

FORMATS = ("train", "openai", "jsonl", "hf")


@dataclass(frozen=True)
class Source:
    """One set of games whose examples are selected together (the filter compares within it)."""

    episodes: Path
    rule: FilterConfig
    weights: WeightConfig


def sources(path: Path, keep: str | None, round_k: int | None) -> list[Source]:
    """What to export from an episodes file or a run directory.

    A file: its games, under rule ``keep`` (default ``all``). A run directory: each round's games
    under the run's own filter and weights (so round k+1's ``train.jsonl`` is what round k's
    games give), or under rule ``keep`` with uniform weights; ``round_k`` takes only the games
    round ``round_k`` trained on, those of round ``round_k − 1``."""
    if keep is not None and keep not in get_args(FilterRule):
        raise ConfigError(f"--keep {keep!r}: expected one of {', '.join(get_args(FilterRule))}")
    if not path.is_dir():
        if round_k is not None:
            raise ConfigError("--round needs a run directory, not an episodes file")
        return [Source(path, FilterConfig(rule=keep or "all"), WeightConfig())]
    run = RunDir(path)
    cfg: RunConfig = run.load_config()
    if keep is None and cfg.weights.scheme == "judge":
        raise ConfigError(
            f"{path}: this run weighs examples by a judge's ratings, which export does not re-ask; "
            "give --keep RULE, or read rounds/<k>/train.jsonl"
        )
    rule, weights = (FilterConfig(rule=keep), WeightConfig()) if keep else (cfg.filter, cfg.weights)  # type: ignore[arg-type]
    played = [k for k in run.present_rounds() if run.round(k).episodes.exists()]
    if round_k is not None:
        if round_k < 1 or round_k - 1 not in played:
            raise ConfigError(
                f"--round {round_k}: round {round_k} trains on round {round_k - 1}'s games, which {path} lacks"
            )
        played = [round_k - 1]
    if not played:
        raise EpisodeFileError(f"{path}: no rounds/<k>/episodes.jsonl in this run directory")
    return [Source(run.round(k).episodes, rule, weights) for k in played]


def export(sources_: Sequence[Source], output: Path, fmt: str) -> int:
    """Select each source's examples and write them all in ``fmt``; returns how many were written
    (for ``openai``, lines: a weight becomes a number of copies)."""
    if fmt not in FORMATS:
        raise ConfigError(f"--format {fmt!r}: expected {', '.join(FORMATS)}")
    selections = []
    for src in sources_:
        episodes = read_episodes(src.episodes)
        selections.append(select_examples(episodes, src.rule, src.weights))
    examples = [ex for s in selections for ex in s.examples]
    if fmt == "train":
        write_examples(output, examples)
        return len(examples)
    if fmt == "openai":
        return export_openai(examples, output)
    rows = [row for s in selections for row in _rows(s)]
    if fmt == "hf":
        save_dataset(rows, output)
    else:
        write_lines_atomic(output, (json.dumps(row) for row in rows))
    return len(rows)


def _rows(selected: Selected) -> list[dict[str, Any]]:
    return [
        {
            "episode_id": side.episode_id,
            "player": side.player,
            "reward": side.reward,
            "raw_score": side.raw_score,
            "agreed": side.agreed,
            "context_key": side.context_key,
            "weight": ex.weight,
            "messages": side.messages,
            "meta": side.meta,
        }
        for ex, side in zip(selected.examples, selected.sides, strict=True)
    ]


def save_dataset(rows: list[dict[str, Any]], output: Path) -> None:
    """Rows as a ``datasets.Dataset`` saved to the folder ``output``, atomically. ``meta``
    (free-form: agents, seeds, round) is kept as a JSON string, so every row has the same columns."""
    from datasets import Dataset, disable_progress_bars

    disable_progress_bars()
    if output.exists() and not (output / "dataset_info.json").exists() and any(output.iterdir()):
        raise ConfigError(f"{output}: a folder that is not a saved dataset; choose another --output")
    table = Dataset.from_list([row | {"meta": json.dumps(row["meta"])} for row in rows])
    partial = output.with_name(output.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    table.save_to_disk(str(partial))
    shutil.rmtree(output, ignore_errors=True)
    partial.rename(output)
