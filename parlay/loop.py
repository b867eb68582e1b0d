"""Rounds of self-play and fine-tuning: play → filter/weight → train → play …

Round 0 plays the starting model (warm-started first when ``warm_start`` is set). Round k
trains the round k−1 model on the filtered, weighted round k−1 games and then plays
``rollout.games`` games with the result. With ``rollout.contexts: same`` every round plays the
same seeded games (contexts, first speakers, sampling seeds), so each round is compared with
round 0 game by game (a paired bootstrap interval).

The run directory (DESIGN.md, "Runs") is the whole state:

    runs/<name>/config.yaml                  the resolved config
    runs/<name>/warm_start/{episodes,train}.jsonl, model/, train_stats.json
    runs/<name>/rounds/<k>/episodes.jsonl    appended one finished game at a time
    runs/<name>/rounds/<k>/train.jsonl       the kept player-episodes and their weights
    runs/<name>/rounds/<k>/model/            adapter (or full weights), renamed into place when complete
    runs/<name>/rounds/<k>/train_stats.json  what training did, or why it was skipped
    runs/<name>/rounds/<k>/metrics.json      written last: the round is complete
    runs/<name>/metrics.jsonl                one line per complete round, rewritten from the above
    runs/<name>/tensorboard/, wandb/         with ``tracking:`` set
    runs/<name>/report.html, plots/          written by ``parlay report`` (and at the end of ``parlay train``)
    runs/<name>/eval/                        a tournament the report shows (``parlay eval --out``)

``resume`` continues from the last complete round and, inside the current round, from whatever
exists: a finished model is not retrained, finished games are not replayed, and the games still
to play are exactly those missing (their seeds do not depend on what was played before). A kill
during training loses only that training pass.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from parlay.agents import Agent, Sampling, load_agent
from parlay.config import ConfigError, RunConfig, parse_config
from parlay.episode import (
    Episode,
    EpisodeWriter,
    PlayerEpisode,
    ReadReport,
    player_episodes,
    read_episodes,
    write_lines_atomic,
)
from parlay.evaluate import METRICS, compute_metrics, paired_difference
from parlay.games.dond import objective
from parlay.improve import judge as judging
from parlay.improve.filters import select
from parlay.improve.sft import TrainExample, TrainStats, read_examples, train, write_examples
from parlay.improve.weights import static_weights
from parlay.rollout import derive_seed, plan_games, play_games, split_finished
from parlay.tracking import Tracker, flatten

log = logging.getLogger(__name__)

# Keys that may differ between the saved config and the one given with --resume.
RESUMABLE_CHANGES = {"rounds", "early_stop", "tracking"}


class Hooks:
    """What the loop reports while it runs; the CLI draws progress bars and tables from it."""

    def stage(self, description: str, total: int) -> None:
        """A stage (playing, training, judging) starts with ``total`` units of work."""

    def advance(self, n: int = 1, **info: Any) -> None:
        """Units of the current stage are done (``info``: deals, loss, …)."""

    def end_stage(self) -> None:
        """The current stage is over."""

    def round_done(self, row: dict[str, Any], history: list[dict[str, Any]]) -> None:
        """A round completed with these metrics (``history``: every complete round so far)."""

    def note(self, text: str) -> None:
        """Something the user should know (a fallback, a skipped round, an early stop)."""


@dataclass(frozen=True)
class ModelRef:
    """A model a round plays with: a base model (name, hub id, path or ``openai:…``) plus an adapter."""

    base: str
    adapter: str | None = None

    def agent_spec(self, dtype: str = "auto", batch: int = 64) -> str:
        if self.base.startswith("openai:"):
            return self.base
        spec = f"hf:{self.base}"
        if self.adapter:
            spec += f"+adapter={self.adapter}"
        return spec + (f"+dtype={dtype}" if dtype != "auto" else "") + (f"+batch={batch}" if batch != 64 else "")

    def to_dict(self) -> dict[str, str | None]:
        return {"base": self.base, "adapter": self.adapter}


class Loop:
    def __init__(self, cfg: RunConfig, hooks: Hooks | None = None) -> None:
        self.cfg = cfg
        self.hooks = hooks or Hooks()
        self.dir = cfg.run_dir
        self.obj = objective(cfg.objective)
        self.tracker: Tracker | None = None
        self.train_step = 0

    # ------------------------------------------------------------------ the run

    def run(self) -> list[dict[str, Any]]:
        """Play and train every round not yet complete; return the metrics of every round."""
        self.tracker = Tracker(self.cfg.tracking, self.dir, self.cfg.name, self.cfg.model_dump(mode="json"))
        try:
            return self._run()
        finally:
            self.tracker.close()

    def _run(self) -> list[dict[str, Any]]:
        cfg = self.cfg
        model = self.warm_start() if cfg.warm_start.enabled else ModelRef(cfg.model, cfg.adapter)
        history = self.history()
        # A resumed run's loss curve continues after the steps already taken.
        self.train_step = sum((r.get("train") or {}).get("steps", 0) for r in history)
        if (self.dir / "warm_start" / "train_stats.json").exists():
            self.train_step += json.loads((self.dir / "warm_start" / "train_stats.json").read_text()).get("steps", 0)
        for k in range(cfg.rounds + 1):
            rdir = self.round_dir(k)
            if (rdir / "metrics.json").exists():
                model = ModelRef(**json.loads((rdir / "metrics.json").read_text())["model"])
                continue
            if self.stopped_early(history):
                break
            started = time.perf_counter()
            stats: dict[str, Any] = {}
            if k > 0:
                model, stats = self.improve(k, model)
            episodes = self.play(k, model)
            row = self.round_metrics(k, model, episodes, stats, time.perf_counter() - started)
            write_lines_atomic(rdir / "metrics.json", [json.dumps(row, indent=1)])
            self.track_round(row)
            history = self.history()
            self.hooks.round_done(row, history)
        if len(history) < cfg.rounds + 1 and self.stopped_early(history):
            self.hooks.note(f"stopped early: no better mean reward for {cfg.early_stop.patience} round(s)")
        return history

    def round_dir(self, k: int) -> Path:
        return self.dir / "rounds" / str(k)

    def history(self) -> list[dict[str, Any]]:
        """Metrics of every complete round, in order; also rewrites ``metrics.jsonl`` from them."""
        rows = [json.loads((self.round_dir(k) / "metrics.json").read_text()) for k in complete_rounds(self.dir)]
        write_lines_atomic(self.dir / "metrics.jsonl", [json.dumps(r) for r in rows])
        return rows

    def stopped_early(self, history: list[dict[str, Any]]) -> bool:
        patience = self.cfg.early_stop.patience
        if patience is None or len(history) <= patience:
            return False
        rewards = [r["mean_reward"] for r in history]
        best_before = max(rewards[:-patience])
        return max(rewards[-patience:]) <= best_before + self.cfg.early_stop.min_delta

    # ------------------------------------------------------------------ warm start

    def warm_start(self) -> ModelRef:
        """Fine-tune the starting model on given or bot-played games (paper §5.3), once."""
        cfg, ws = self.cfg, self.cfg.warm_start
        wdir, start = self.dir / "warm_start", ModelRef(cfg.model, cfg.adapter)
        stats_path = wdir / "train_stats.json"
        if stats_path.exists():
            return self._trained_ref(wdir, start, json.loads(stats_path.read_text()))
        if ws.episodes:
            episodes = _read(Path(ws.episodes))
        else:
            a, b = (load_agent(s) for s in ws.bots or [])
            games = plan_games(ws.games, derive_seed(cfg.seed, 7919))
            self.hooks.stage(f"warm start: {a.spec} vs {b.spec}", len(games))
            episodes = play_games(a, b, games, self.obj, cfg.rollout.max_messages, on_episode=self._advance_game)
            self.hooks.end_stage()
            write_lines_atomic(wdir / "episodes.jsonl", (ep.model_dump_json() for ep in episodes))
        keep = {
            "all": lambda pe: True,
            "nonzero": lambda pe: pe.reward > 0,
            "agreed": lambda pe: pe.agreed,
        }[ws.filter]
        examples = [
            TrainExample(messages=pe.messages, reward=pe.reward, episode_id=pe.episode_id, player=pe.player)
            for ep in episodes
            for pe in player_episodes(ep)
            if keep(pe)
        ]
        if not examples:
            raise ConfigError(f"warm start: no demonstration passes filter {ws.filter!r}")
        write_examples(wdir / "train.jsonl", examples)
        stats = self.fine_tune(wdir, start, "warm start", key=0, epochs=ws.epochs, lr=ws.lr)
        write_lines_atomic(stats_path, [json.dumps(stats)])
        return self._trained_ref(wdir, start, stats)

    # ------------------------------------------------------------------ improve

    def improve(self, k: int, model: ModelRef) -> tuple[ModelRef, dict[str, Any]]:
        """Round k's training on round k−1's games; returns the model to play and what happened."""
        cfg, rdir = self.cfg, self.round_dir(k)
        stats_path = rdir / "train_stats.json"
        if stats_path.exists():  # trained (or skipped) before a kill
            stats = json.loads(stats_path.read_text())
            return self._trained_ref(rdir, model, stats), stats
        prev = _read(self.round_dir(k - 1) / "episodes.jsonl")
        pairs = [(pe, ep) for ep in prev for pe in player_episodes(ep)]
        pes = [pe for pe, _ in pairs]
        selection = select(pes, cfg.filter)
        # A side with no accepted turn of its own (an aborted game) has nothing to imitate.
        kept = [i for i in selection.kept if any(m["role"] == "assistant" for m in pes[i].messages)]
        info: dict[str, Any] = {
            "player_episodes": len(pes),
            "filter_rule": selection.rule,
            "passed_filter": len(selection.kept),
        }
        if selection.note:
            self.hooks.note(f"round {k}: {selection.note}")
            info["filter_note"] = selection.note
        ratings: list[float | None] | None = None
        if cfg.weights.scheme == "judge":
            ratings = self.judge(k, pairs)
            info["judge"] = judging.correlation(ratings, [pe.reward for pe in pes])
            if cfg.weights.judge.mode == "filter":
                kept = [i for i in kept if (ratings[i] or 0) >= cfg.weights.judge.min_rating]
        weights = static_weights(
            cfg.weights,
            [pes[i].reward for i in kept],
            [selection.baselines[i] for i in kept],
            [ratings[i] for i in kept] if ratings else None,
        )
        examples = [
            TrainExample(
                messages=pes[i].messages,
                weight=w,
                reward=pes[i].reward,
                episode_id=pes[i].episode_id,
                player=pes[i].player,
                rating=ratings[i] if ratings else None,
            )
            for i, w in zip(kept, weights, strict=True)
            if w > 0
        ]
        info["kept"] = len(examples)
        write_examples(rdir / "train.jsonl", examples)
        if not examples:
            info |= {"skipped": True}
            self.hooks.note(f"round {k}: no examples to train on; round {k} plays the round {k - 1} model")
        else:
            info |= self.fine_tune(rdir, model, f"round {k}: training", key=k) | {"skipped": False}
        write_lines_atomic(stats_path, [json.dumps(info)])
        return self._trained_ref(rdir, model, info), info

    def _trained_ref(self, rdir: Path, model: ModelRef, stats: dict[str, Any]) -> ModelRef:
        if stats.get("skipped"):
            return model
        if self.cfg.train.backend == "openai":
            return ModelRef(stats["model"])
        if self.cfg.train.lora:
            return ModelRef(model.base, str(rdir / "model"))
        return ModelRef(str(rdir / "model"))

    def fine_tune(
        self, out_dir: Path, model: ModelRef, label: str, key: int, epochs: float | None = None, lr: float | None = None
    ) -> dict[str, Any]:
        """Train ``model`` on ``out_dir/train.jsonl`` into ``out_dir/model``; what training reported."""
        cfg = self.cfg
        data = out_dir / "train.jsonl"
        if cfg.train.backend == "openai":
            return self._openai(out_dir, model, data)
        if cfg.train.launcher == "accelerate":
            return self._accelerate(out_dir, model, data, epochs, lr).to_dict()
        examples = read_examples(data)
        total = {"steps": 0}

        def step(done: int, of: int, loss: float) -> None:
            if not total["steps"]:
                total["steps"] = of
                self.hooks.stage(f"{label} on {len(examples)} examples", of)
            self.hooks.advance(loss=loss)
            self.train_step += 1
            if self.tracker is not None:
                self.tracker.log({"train/loss": loss}, self.train_step, "train/step")

        try:
            return train(
                examples,
                model.base,
                out_dir / "model",
                cfg.train,
                adapter=model.adapter,
                weights=cfg.weights,
                seed=derive_seed(cfg.seed, key, 31),
                epochs=epochs,
                lr=lr,
                on_step=step,
            ).to_dict()
        finally:
            self.hooks.end_stage()

    def _accelerate(
        self, out_dir: Path, model: ModelRef, data: Path, epochs: float | None, lr: float | None
    ) -> TrainStats:
        """The same trainer under ``accelerate launch`` (several GPUs, DeepSpeed, FSDP)."""
        stats_file = out_dir / "sft_stats.json"
        cmd = [
            sys.executable, "-m", "accelerate.commands.launch", *self.cfg.train.accelerate_args,
            "-m", "parlay", "sft", str(data), "--model", model.base, "--out", str(out_dir / "model"),
            "--config", str(self.dir / "config.yaml"), "--stats", str(stats_file),
        ]  # fmt: skip
        if model.adapter:
            cmd += ["--adapter", model.adapter]
        if epochs is not None:
            cmd += ["--epochs", str(epochs)]
        if lr is not None:
            cmd += ["--lr", str(lr)]
        self.hooks.note("training under: " + " ".join(cmd))
        result = subprocess.run(cmd, env=os.environ.copy())
        if result.returncode != 0:
            raise RuntimeError(f"accelerate launch failed with exit status {result.returncode}: {' '.join(cmd)}")
        return TrainStats(**json.loads(stats_file.read_text()))

    def _openai(self, out_dir: Path, model: ModelRef, data: Path) -> dict[str, Any]:
        from parlay.improve.openai_ft import export, fine_tune

        name, _, url = model.base.removeprefix("openai:").partition("@")
        path = out_dir / "openai_train.jsonl"
        lines = export(read_examples(data), path, seed=self.cfg.seed)
        new = fine_tune(
            path,
            self.cfg.train.openai_base_model or name,
            url or None,
            suffix=self.cfg.name[:18],
            seed=self.cfg.seed,
            poll_seconds=self.cfg.train.poll_seconds,
            on_status=lambda s: self.hooks.note(f"{out_dir.name}: fine-tuning job {s}"),
        )
        return {"model": f"openai:{new}" + (f"@{url}" if url else ""), "lines": lines}

    def judge(self, k: int, pairs: list[tuple[PlayerEpisode, Episode]]) -> list[float | None]:
        cfg = self.cfg.weights.judge
        agent = load_agent(cfg.agent or "", Sampling(temperature=0.0, max_new_tokens=32))
        self.hooks.stage(f"round {k}: judging with {agent.spec}", len(pairs))
        try:
            ratings = judging.rate(agent, pairs, seed=self.cfg.seed)
        finally:
            self.hooks.advance(len(pairs))
            self.hooks.end_stage()
            agent.close()
        return ratings

    # ------------------------------------------------------------------ play

    def games(self, k: int):
        r = self.cfg.rollout
        seed = self.cfg.seed if r.contexts == "same" else derive_seed(self.cfg.seed, k)
        return plan_games(r.games, seed)

    def play(self, k: int, model: ModelRef) -> list[Episode]:
        """Round k's games; those already in episodes.jsonl are kept and not replayed."""
        r = self.cfg.rollout
        path = self.round_dir(k) / "episodes.jsonl"
        games = self.games(k)
        have, todo = split_finished(path, games)
        if todo:
            agent = self._agent(model)
            self.hooks.stage(f"round {k}: self-play", len(games))
            self.hooks.advance(len(have), deals=sum(ep.agreed for ep in have.values()))
            try:
                with EpisodeWriter(path, append=True) as writer:
                    played = play_games(
                        agent, agent, todo, self.obj, r.max_messages, writer, self._advance_game, {"round": k}
                    )
            finally:
                self.hooks.end_stage()
                agent.close()
            have |= {ep.id: ep for ep in played}
        return [have[g.id] for g in games]

    def _agent(self, model: ModelRef) -> Agent:
        r = self.cfg.rollout
        sampling = Sampling(r.temperature, r.top_p, r.max_new_tokens, self.cfg.seed)
        return load_agent(model.agent_spec(r.dtype, r.batch), sampling)

    def _advance_game(self, ep: Episode) -> None:
        self.hooks.advance(deals=int(ep.agreed), tokens=sum(t.tokens or 0 for t in ep.turns))

    # ------------------------------------------------------------------ metrics

    def track_round(self, row: dict[str, Any]) -> None:
        """A complete round's figures, namespaced: rollout/ (its games), train/, eval/ (vs round 0)."""
        if self.tracker is None or not self.tracker.active:
            return
        games = {k: v for k, v in row.items() if k in METRICS}
        figures = flatten("rollout", games) | flatten("train", row.get("train") or {})
        vs = row.get("vs_round0")
        if vs:
            figures |= {
                "eval/vs_round0": vs["mean"],
                "eval/vs_round0_low": vs["ci95"][0],
                "eval/vs_round0_high": vs["ci95"][1],
            }
        self.tracker.log(figures, row["round"])

    def round_metrics(
        self, k: int, model: ModelRef, episodes: list[Episode], stats: dict[str, Any], seconds: float
    ) -> dict[str, Any]:
        row: dict[str, Any] = {"round": k, "model": model.to_dict()} | compute_metrics(episodes)
        row["train"] = stats
        row["minutes"] = seconds / 60
        if k > 0 and self.cfg.rollout.contexts == "same":
            row["vs_round0"] = paired_difference(episodes, _read(self.round_dir(0) / "episodes.jsonl"))
        return row


def _read(path: Path) -> list[Episode]:
    report = ReadReport()
    episodes = read_episodes(path, report)
    if report.truncated_tail:
        log.warning("%s: the last line was cut short by an interrupted write; that game is played again", path)
    if not episodes:
        raise ConfigError(f"{path}: no episodes")
    return episodes


# ---------------------------------------------------------------------- run directories


def prepare_run(cfg: RunConfig, resume: bool) -> RunConfig:
    """Create the run directory and save the resolved config, or check it for ``resume``.

    Returns the config to run with (on resume: the saved one, with the allowed changes)."""
    path = cfg.run_dir / "config.yaml"
    if not resume:
        if path.exists():
            raise ConfigError(
                f"{cfg.run_dir} already holds a run; pass --resume to continue it, or choose another name"
            )
        cfg.run_dir.mkdir(parents=True, exist_ok=True)
        write_lines_atomic(path, [cfg.to_yaml()])
        return cfg
    if not path.exists():
        raise ConfigError(f"{cfg.run_dir}: no run to resume (config.yaml is missing)")
    saved = parse_config(yaml.safe_load(path.read_text()), str(path))
    differ = _differences(saved.model_dump(), cfg.model_dump())
    blocked = sorted(d for d in differ if d.split(".")[0] not in RESUMABLE_CHANGES)
    if blocked:
        raise ConfigError(
            f"{path}: the config given differs from the saved run in {', '.join(blocked)}; "
            "a resumed run keeps its settings (only rounds and early_stop may change)"
        )
    if differ:
        write_lines_atomic(path, [cfg.to_yaml()])
    return cfg


def _differences(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        keys = a.keys() | b.keys()
        return [d for k in sorted(keys) for d in _differences(a.get(k), b.get(k), f"{prefix}{k}.")]
    return [] if a == b else [prefix.rstrip(".")]


def load_saved(run_dir: Path) -> RunConfig:
    path = run_dir / "config.yaml"
    if not path.exists():
        raise ConfigError(f"{run_dir}: no run to resume (config.yaml is missing)")
    return parse_config(yaml.safe_load(path.read_text()), str(path))


def complete_rounds(run_dir: Path) -> list[int]:
    """The rounds of a run whose ``metrics.json`` exists, in order (a gap ends the list)."""
    rounds = []
    while (run_dir / "rounds" / str(len(rounds)) / "metrics.json").exists():
        rounds.append(len(rounds))
    return rounds


def round_agent_spec(spec: str) -> tuple[str, str]:
    """``run:DIR[@K]`` → (``run:DIR@K``, the agent spec of round K's model of the run in DIR);
    K defaults to the last complete round. Any other spec is returned as (spec, spec)."""
    if not spec.startswith("run:"):
        return spec, spec
    where, _, k = spec.removeprefix("run:").partition("@")
    run_dir = Path(where)
    rounds = complete_rounds(run_dir)
    if not rounds:
        raise ConfigError(f"{spec}: {run_dir} has no complete round (no rounds/0/metrics.json)")
    if k and not k.isdigit():
        raise ConfigError(f"{spec}: the round after @ must be a whole number")
    chosen = int(k) if k else rounds[-1]
    if chosen not in rounds:
        raise ConfigError(f"{spec}: round {chosen} is not complete in {run_dir} (complete: 0..{rounds[-1]})")
    row = json.loads((run_dir / "rounds" / str(chosen) / "metrics.json").read_text())
    return f"run:{where}@{chosen}", ModelRef(**row["model"]).agent_spec(load_saved(run_dir).rollout.dtype)
