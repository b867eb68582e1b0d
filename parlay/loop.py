"""Rounds of self-play and fine-tuning: play → judge → select → fit → play …

Round 0 plays the starting model (warm-started first when ``warm_start`` is set). Round k
trains the round k−1 model on the examples selected from round k−1's games and then plays
``rollout.games`` games with the result. With ``rollout.contexts: same`` every round plays the
same seeded games (contexts, first speakers, sampling seeds), so each round is compared with
round 0 game by game (a paired bootstrap interval). A round's games are split between the
partners of ``partners:`` (itself by default; ``league.py``), and the held-out partners' games
are played alongside them in the same batches: measured every round, never trained on.

The run directory (``parlay/run.py``) is the whole state. A resumed run continues from the last
complete round and, inside the current round, from whatever exists: a finished model is not
retrained, finished games are not replayed, and the games still to play are exactly those
missing (their seeds do not depend on what was played before). A kill during training loses
only that training pass, or with ``train.checkpoint_steps`` only the steps since its last
checkpoint.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from parlay.agents import load_agent, load_judge
from parlay.agents.base import Sampling
from parlay.config import ConfigError, RunConfig, WeightConfig
from parlay.distributed import RayPool, RemoteAgent
from parlay.episode import Episode, EpisodeWriter, ReadReport, read_episodes, write_episodes
from parlay.evaluate import METRICS, compute_metrics, paired_difference
from parlay.evaluate.metrics import partner_summary
from parlay.games.dond import objective
from parlay.improve import TrainingDiverged
from parlay.improve import judge as judging
from parlay.improve.examples import Selected, learner_sides, select_examples, write_examples
from parlay.improve.trainers import FitRequest, make_trainer
from parlay.league import League, heldout_games, round_games
from parlay.rollout import derive_seed, plan_games, play_games, play_matches, split_finished
from parlay.run import ModelRef, RoundRecord, RunDir, StageDir, TrainInfo
from parlay.tracking import Tracker, flatten

log = logging.getLogger(__name__)


class Hooks:
    """What the loop reports while it runs; the CLI draws progress bars and tables from it."""

    def stage(self, description: str, total: int) -> None:
        """A stage (playing, training, judging) starts with ``total`` units of work."""

    def advance(self, n: int = 1, **info: Any) -> None:
        """Units of the current stage are done (``info``: deals, tokens, loss, …)."""

    def end_stage(self) -> None:
        """The current stage is over."""

    def round_done(self, record: RoundRecord, records: list[RoundRecord]) -> None:
        """A round completed (``records``: every complete round so far)."""

    def note(self, text: str) -> None:
        """Something the user should know (a fallback, a skipped round, an early stop)."""


class Loop:
    def __init__(self, cfg: RunConfig, hooks: Hooks | None = None) -> None:
        self.cfg = cfg
        self.hooks = hooks or Hooks()
        self.run_dir = RunDir(cfg.run_dir)
        self.obj = objective(cfg.objective)
        self.trainer = make_trainer(cfg, self.run_dir.config_file)
        self.tracker: Tracker | None = None
        self.train_step = 0
        self.pool: RayPool | None = None
        self.load = load_agent

    def run(self) -> list[RoundRecord]:
        """Play and train every round not yet complete; return the record of every round."""
        r = self.cfg.rollout
        self.pool = RayPool(r.workers, r.ray_address) if r.workers else None
        self.load = RemoteAgent if self.pool else load_agent  # with Ray, the workers load the agents
        sampling = Sampling(r.temperature, r.top_p, r.max_new_tokens, self.cfg.seed)
        self.league = League(self.cfg, self.run_dir, sampling, self.load)
        self.tracker = Tracker(self.cfg.tracking, self.run_dir.path, self.cfg.name, self.cfg.model_dump(mode="json"))
        try:
            return self._rounds()
        finally:
            self.tracker.close()
            self.league.close()
            if self.pool is not None:
                self.pool.close()

    def _rounds(self) -> list[RoundRecord]:
        cfg, run = self.cfg, self.run_dir
        model = ModelRef(base=cfg.model, adapter=cfg.adapter)
        if cfg.warm_start.enabled:
            model = self.warm_start(model)
        records = run.records()
        self.train_step += sum(r.train.steps for r in records if r.train)  # a resumed loss curve goes on
        for k in range(cfg.rounds + 1):
            if run.round(k).complete:
                model = run.round(k).record().model
                continue
            if self.stopped_early(records):
                break
            started = time.perf_counter()
            info = self.improve(k, model) if k > 0 else None
            model = info.model if info else model
            episodes, heldout = self.play(k, model, records)
            record = self.record(k, model, episodes, heldout, info, (time.perf_counter() - started) / 60)
            records = run.write_record(record)
            self.track(record)
            self.hooks.round_done(record, records)
        if len(records) < cfg.rounds + 1 and self.stopped_early(records):
            self.hooks.note(f"stopped early: no better mean reward for {cfg.early_stop.patience} round(s)")
        return records

    def stopped_early(self, records: list[RoundRecord]) -> bool:
        patience = self.cfg.early_stop.patience
        if patience is None or len(records) <= patience:
            return False
        rewards = [r.metrics["mean_reward"] for r in records]
        return max(rewards[-patience:]) <= max(rewards[:-patience]) + self.cfg.early_stop.min_delta

    # ------------------------------------------------------------------ the stages

    def warm_start(self, start: ModelRef) -> ModelRef:
        """Fine-tune the starting model once, on given or bot-played games (paper §5.3)."""
        ws, stage = self.cfg.warm_start, self.run_dir.warm_start
        done = stage.train_info(start, self.cfg.train.lora)
        if done is not None:
            self.train_step += done.steps
            return done.model
        if ws.episodes:
            episodes = _read(Path(ws.episodes))
        else:
            a, b = (load_agent(s) for s in ws.bots or [])
            games = plan_games(ws.games, derive_seed(self.cfg.seed, 7919))
            self.hooks.stage(f"warm start: {a.spec} vs {b.spec}", len(games))
            episodes = play_games(a, b, games, self.obj, self.cfg.rollout.max_messages, on_episode=self._advance_game)
            self.hooks.end_stage()
            write_episodes(stage.episodes, episodes)
        selected = select_examples(episodes, ws.filter, WeightConfig())
        if not selected.examples:
            raise ConfigError(f"warm start: no demonstration passes filter rule {ws.filter.rule!r}")
        return self.fit(stage, start, selected, "warm start", key=0, epochs=ws.epochs, lr=ws.lr).model

    def improve(self, k: int, model: ModelRef) -> TrainInfo:
        """Round k's training on round k−1's games: judge → select → fit."""
        stage = self.run_dir.round(k)
        done = stage.train_info(model, self.cfg.train.lora)
        if done is not None:  # trained (or skipped) before a kill
            return done
        episodes = _read(self.run_dir.round(k - 1).episodes)
        ratings = self.judge(k, episodes) if self.cfg.weights.scheme == "judge" else None
        selected = select_examples(episodes, self.cfg.filter, self.cfg.weights, ratings)
        if selected.info.note:
            self.hooks.note(f"round {k}: {selected.info.note}")
        if selected.examples:
            try:
                return self.fit(stage, model, selected, f"round {k}: training", key=k)
            except TrainingDiverged as exc:
                self.hooks.note(f"round {k}: training failed: {exc}; round {k} plays the round {k - 1} model")
                info = TrainInfo(selection=selected.info, trained=False, model=model, failure=str(exc))
                stage.write_train_info(info)
                return info
        self.hooks.note(f"round {k}: no examples to train on; round {k} plays the round {k - 1} model")
        write_examples(stage.train_data, [])
        info = TrainInfo(selection=selected.info, trained=False, model=model)
        stage.write_train_info(info)
        return info

    def judge(self, k: int, episodes: list[Episode]) -> list[float | None]:
        sides = learner_sides(episodes)
        agent = load_judge(self.cfg.weights.judge.agent or "", self.cfg.seed)
        self.hooks.stage(f"round {k}: judging with {agent.spec}", len(sides))
        try:
            return judging.rate(agent, sides, seed=self.cfg.seed)
        finally:
            self.hooks.advance(len(sides))
            self.hooks.end_stage()
            agent.close()

    def fit(
        self, stage: StageDir, start: ModelRef, selected: Selected, label: str, key: int, epochs=None, lr=None
    ) -> TrainInfo:
        """Train ``start`` on ``selected`` into ``stage``; its ``train_stats.json`` is written last."""
        write_examples(stage.train_data, selected.examples)
        request = FitRequest(stage, start, selected.info, derive_seed(self.cfg.seed, key, 31), epochs, lr)

        def on_step(done: int, of: int, loss: float) -> None:
            if done == 1:
                self.hooks.stage(f"{label} on {len(selected.examples)} examples", of)
            self.hooks.advance(loss=loss)
            self.train_step += 1
            if self.tracker is not None:
                self.tracker.log({"train/loss": loss}, self.train_step, "train/step")

        try:
            info = self.trainer.fit(request, on_step, self.hooks.note)
        finally:
            self.hooks.end_stage()
        stage.write_train_info(info)
        return info

    def play(self, k: int, model: ModelRef, records: list[RoundRecord]) -> tuple[list[Episode], list[list[Episode]]]:
        """Round k's games with its partners, and its games with each held-out partner, all played
        at once; those already written are kept and not replayed."""
        r, stage = self.cfg.rollout, self.run_dir.round(k)
        games = round_games(self.cfg, k)
        have, todo = split_finished(stage.episodes, games)
        held = [heldout_games(self.cfg, i) for i in range(len(self.cfg.heldout.partners))]
        held_have = [split_finished(stage.heldout_episodes(i), plan)[0] for i, plan in enumerate(held)]
        held_todo = sum(len(plan) - len(h) for plan, h in zip(held, held_have, strict=True))
        if todo or held_todo:
            sampling = Sampling(r.temperature, r.top_p, r.max_new_tokens, self.cfg.seed)
            learner = self.load(model.agent_spec(r.dtype, r.batch, r.backend), sampling)
            self.hooks.stage(f"round {k}: play", len(games) + sum(len(p) for p in held))
            self.hooks.advance(len(have) + sum(len(h) for h in held_have), deals=sum(ep.agreed for ep in have.values()))
            writers: list[EpisodeWriter] = []
            try:
                writers.append(EpisodeWriter(stage.episodes, append=True))
                matches = self.league.matches(k, todo, learner, records, writers[0])
                done = {spec: set(h) for spec, h in zip(self.cfg.heldout.partners, held_have, strict=True)}
                extra, held_writers = self.league.heldout_matches(k, learner, done)
                writers += held_writers
                play = self.pool.play_matches if self.pool else play_matches
                played = play(matches + extra, self.obj, r.max_messages, self._advance_game, r.max_reply_chars)
            finally:
                for w in writers:
                    w.close()
                self.hooks.end_stage()
                learner.close()
                self.league.end_round()
            for ep in played:
                if ep.meta.get("heldout"):
                    held_have[self.cfg.heldout.partners.index(ep.meta["partner"])][ep.id] = ep
                else:
                    have[ep.id] = ep
        return [have[g.id] for g in games], [[h[g.id] for g in plan] for h, plan in zip(held_have, held, strict=True)]

    # ------------------------------------------------------------------ records and progress

    def record(
        self,
        k: int,
        model: ModelRef,
        episodes: list[Episode],
        heldout: list[list[Episode]],
        info: TrainInfo | None,
        minutes: float,
    ) -> RoundRecord:
        paired = k > 0 and self.cfg.rollout.contexts == "same"
        round0 = _read(self.run_dir.round(0).episodes) if paired else []
        vs = paired_difference(episodes, round0) if paired else None
        partners = {}
        for name in dict.fromkeys(ep.meta.get("partner", "self") for ep in episodes):
            mine = [ep for ep in episodes if ep.meta.get("partner", "self") == name]
            ids = {ep.id for ep in mine}
            before = [ep for ep in round0 if ep.id in ids and ep.meta.get("partner", "self") == name]
            partners[name] = partner_summary(mine, before if before else None)
        held = {}
        for i, (spec, games) in enumerate(zip(self.cfg.heldout.partners, heldout, strict=True)):
            before = _read(self.run_dir.round(0).heldout_episodes(i)) if k > 0 else None
            held[spec] = partner_summary(games, before)
        return RoundRecord(
            round=k,
            model=model,
            metrics=compute_metrics(episodes),
            train=info,
            minutes=minutes,
            vs_round0=vs,
            partners=partners,
            heldout=held or None,
        )

    def track(self, record: RoundRecord) -> None:
        """A complete round's figures, namespaced: rollout/ (its games), train/, eval/ (vs round 0,
        and the held-out partners)."""
        if self.tracker is None or not self.tracker.active:
            return
        figures = flatten("rollout", {k: v for k, v in record.metrics.items() if k in METRICS})
        if record.train is not None:
            train = record.train.model_dump(include={"selection", "stats", "job"})
            figures |= flatten("train", {**(train["selection"] or {}), **(train["stats"] or {})})
        if record.vs_round0:
            vs = record.vs_round0
            figures |= {"eval/vs_round0": vs["mean"], "eval/vs_round0_low": vs["ci95"][0]}
            figures |= {"eval/vs_round0_high": vs["ci95"][1]}
        for spec, f in (record.heldout or {}).items():  # eval/heldout/<partner>/…: never trained with
            figures |= {
                f"eval/heldout/{spec}/reward": f["mean_reward"],
                f"eval/heldout/{spec}/agreement": f["agreement_rate"],
            }
        self.tracker.log(figures, record.round)

    def _advance_game(self, ep: Episode) -> None:
        self.hooks.advance(deals=int(ep.agreed), tokens=sum(t.tokens or 0 for t in ep.turns))


def _read(path: Path) -> list[Episode]:
    report = ReadReport()
    episodes = read_episodes(path, report)
    if report.truncated_tail:
        log.warning("%s: the last line was cut short by an interrupted write; that game is left out", path)
    if not episodes:
        raise ConfigError(f"{path}: no episodes")
    return episodes
