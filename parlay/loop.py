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

import functools
import logging
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from parlay.agents import load_agent, load_judge
from parlay.agents.base import Sampling
from parlay.agents.resolve import model_agent
from parlay.config import RunConfig
from parlay.distributed import RayPool, RemoteAgent
from parlay.episode import Episode, EpisodeWriter, ReadReport, read_episodes, write_episodes
from parlay.errors import ConfigError
from parlay.evaluate import METRICS, compute_metrics, paired_difference
from parlay.evaluate.metrics import partner_summary
from parlay.games.dond import objective
from parlay.improve import TrainingDiverged
from parlay.improve import judge as judging
from parlay.improve.batches import check_room
from parlay.improve.examples import Selected, learner_sides, select_examples, write_examples
from parlay.improve.trainers import FitRequest, make_trainer
from parlay.improve.warm import bot_demonstrations, warm_examples
from parlay.league import League, RoundGames
from parlay.locking import FolderLock
from parlay.protocol import Game
from parlay.rollout import Match, derive_seed, plan_games, play_matches
from parlay.run import ModelRef, RoundRecord, RunDir, StageDir, TrainInfo, prepare_run
from parlay.seeds import SeedRuns, seed_folder
from parlay.tracking import Tracker, flatten

log = logging.getLogger(__name__)


class Hooks:
    """What the loop reports while it runs; the CLI draws progress bars and tables from it."""

    def stage(self, description: str, total: int, started: float | None = None) -> None:
        """A stage (playing, training, judging) starts with ``total`` units of work; ``started``:
        when its work began (``time.perf_counter()``), if before this call (default: now)."""

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
        r = cfg.rollout
        self.sampling = Sampling(r.temperature, r.top_p, r.max_new_tokens, cfg.seed)
        """How every model of the run samples its turns (the learner, checkpoints, partners)."""

    def run(self) -> list[RoundRecord]:
        """Play and train every round not yet complete; return the record of every round."""
        self.check_room()
        r = self.cfg.rollout
        self.pool = RayPool(r.workers, r.ray_address) if r.workers else None
        self.load = RemoteAgent if self.pool else load_agent  # with Ray, the workers load the agents
        self.league = League(self.cfg, self.run_dir, self.sampling, self.load)
        self.tracker = Tracker(self.cfg.tracking, self.run_dir.path, self.cfg.name, self.cfg.model_dump(mode="json"))
        try:
            return self._rounds()
        finally:
            self.tracker.close()
            self.league.close()
            if self.pool is not None:
                self.pool.close()

    def check_room(self) -> None:
        """``train.max_length`` holds a game's opening and a reply (``check_max_length``)."""
        check_max_length(self.cfg)

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
            games = self.play(k, model, records)
            minutes = (time.perf_counter() - started) / 60
            record = self.record(k, model, games.episodes, games.heldout_episodes, info, minutes, games.by_partner())
            records = run.write_record(record)
            self.track(record)
            self.hooks.round_done(record, records)
        if len(records) < cfg.rounds + 1 and self.stopped_early(records):
            self.hooks.note(f"stopped early: no better mean reward for {cfg.early_stop.patience} round(s)")
        return records

    def stopped_early(self, records: list[RoundRecord]) -> bool:
        return stopped_early(self.cfg, records)

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
            r = self.cfg.rollout
            try:
                episodes = bot_demonstrations(
                    ws, self.obj, self.cfg.seed, r.max_messages, self.hooks.stage, self._advance_game
                )
            finally:
                self.hooks.end_stage()
            write_episodes(stage.episodes, episodes)
        selected = warm_examples(episodes, ws)
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
        seed = derive_seed(self.cfg.seed, key, 31)
        request = FitRequest(stage, start, selected.info, seed, epochs, lr, examples=selected.examples)

        began = time.perf_counter()  # the stage is announced at its first step, when its size is known

        def on_step(done: int, of: int, loss: float, tokens: int) -> None:
            if done == 1:
                self.hooks.stage(f"{label} on {len(selected.examples)} examples", of, started=began)
            self.hooks.advance(loss=loss, tokens=tokens)
            self.train_step += 1
            if self.tracker is not None:
                self.tracker.log({"train/loss": loss}, self.train_step, "train/step")

        try:
            info = self.trainer.fit(request, on_step, self.hooks.note)
        finally:
            self.hooks.end_stage()
        stage.write_train_info(info)
        return info

    def play(self, k: int, model: ModelRef, records: list[RoundRecord]) -> RoundGames:
        """Round k's plan (its games with its partners and with each held-out partner), its
        unfinished games played all at once, and every game read back by the plan."""
        plan = self.league.plan(k, records)
        have = plan.finished()
        todo = [g for g in plan.games if g.game.id not in have[g.table]]
        if not todo:
            return plan.collect(have)
        learner = self.load(model_agent(model, self.cfg.rollout), self.sampling)
        self.hooks.stage(f"round {k}: play", len(plan.games))
        self.hooks.advance(sum(map(len, have)), deals=sum(ep.agreed for ep in have[0].values()))
        try:
            with ExitStack() as files:
                writers = {t: EpisodeWriter(plan.tables[t].path, append=True) for t in sorted({g.table for g in todo})}
                for writer in writers.values():
                    files.enter_context(writer)
                partners = [self.league.agent(g, learner) for g in todo]
                matches = [
                    Match(g.game, learner, b, g.meta, writers[g.table]) for g, b in zip(todo, partners, strict=True)
                ]
                play = self.pool.play_matches if self.pool else play_matches
                r = self.cfg.rollout
                played = play(matches, self.obj, r.max_messages, self._advance_game, r.max_reply_chars)
        finally:
            self.hooks.end_stage()
            learner.close()
            self.league.end_round()
        for g, ep in zip(todo, played, strict=True):
            have[g.table][ep.id] = ep
        return plan.collect(have)

    # ------------------------------------------------------------------ records and progress

    def record(
        self,
        k: int,
        model: ModelRef,
        episodes: list[Episode],
        heldout: list[list[Episode]],
        info: TrainInfo | None,
        minutes: float,
        by_partner: dict[str, list[Episode]] | None = None,
    ) -> RoundRecord:
        """Round k's record: its metrics, per partner and per held-out partner (``heldout``: in
        the order of ``heldout.partners``), each with the paired change from round 0 where round 0
        played the same games with the same partner. ``by_partner``: the training games per
        partner, from the round's plan (``RoundGames.by_partner``); None reads the partner of
        each game from its record (games read back from files)."""
        if by_partner is None:
            by_partner = {}
            for ep in episodes:
                by_partner.setdefault(ep.meta.get("partner", "self"), []).append(ep)
        paired = k > 0 and self.cfg.rollout.contexts == "same"
        round0 = _read(self.run_dir.round(0).episodes) if paired else []
        vs = paired_difference(episodes, round0) if paired else None
        partners = {}
        for name, mine in by_partner.items():
            ids = {ep.id for ep in mine}  # round 0's games are records: read by their partner's name
            before = [ep for ep in round0 if ep.id in ids and ep.meta.get("partner", "self") == name]
            partners[name] = partner_summary(mine, before if before else None)
        held = {}
        for i, (spec, played) in enumerate(zip(self.cfg.heldout.partners, heldout, strict=True)):
            before = _read(self.run_dir.round(0).heldout_episodes(i)) if k > 0 else None
            held[str(spec)] = partner_summary(played, before)
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


def stopped_early(cfg: RunConfig, records: list[RoundRecord]) -> bool:
    """Whether ``early_stop`` ends a run whose complete rounds are ``records``: the last
    ``patience`` rounds brought no mean reward above the best before them by more than ``min_delta``."""
    patience = cfg.early_stop.patience
    if patience is None or len(records) <= patience:
        return False
    rewards = [r.metrics["mean_reward"] for r in records]
    return max(rewards[-patience:]) <= max(rewards[:-patience]) + cfg.early_stop.min_delta


def finished(cfg: RunConfig) -> bool:
    """Whether the run of ``cfg`` has nothing left to do: every round complete, or stopped early."""
    records = RunDir(cfg.run_dir).records()
    return len(records) == cfg.rounds + 1 or stopped_early(cfg, records)


def _read(path: Path) -> list[Episode]:
    report = ReadReport()
    episodes = read_episodes(path, report)
    if report.truncated_tail:
        log.warning("%s: the last line was cut short by an interrupted write; that game is left out", path)
    if not episodes:
        raise ConfigError(f"{path}: no episodes")
    return episodes


def check_max_length(cfg: RunConfig) -> None:
    """``train.max_length`` holds a game's opening and a reply, checked with the model's own
    tokenizer before anything is played or written (``check_room``'s ``ConfigError`` otherwise)."""
    if cfg.train.backend == "openai":
        return
    from parlay.agents.models import resolve

    game = plan_games(1, cfg.seed)[0]
    first = game.first_speaker
    opening = Game(game.context, objective(cfg.objective), first, cfg.rollout.max_messages).conversation(first)
    try:
        tokenizer = _tokenizer(resolve(cfg.model))
    except (OSError, ValueError):  # not loadable here: loading the model will say why, by name
        return
    check_room(tokenizer, opening, cfg.train.max_length, cfg.rollout.max_new_tokens)


@functools.cache
def _tokenizer(path: str):
    """The tokenizer of the model in ``path``, loaded once per process (a run checks its room
    before its folder is made and again as it starts, and a run over seeds once per seed)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def train(cfg: RunConfig, resume: bool, hooks: Hooks | None = None, steal_lock: bool = False) -> list[RoundRecord]:
    """``parlay train``: create the run of ``cfg`` (or, with ``resume``, check ``cfg`` against
    it), then play and train every round not yet complete, holding the run folder's lock (one
    writer per run). ``ConfigError``: a run already there without ``resume``, none to resume, a run
    over seeds in the folder (a single run there would hide it), or a ``train.max_length`` too short
    (all said before the folder is locked, and so created); ``LockError``: a live writer."""
    run = RunDir(cfg.run_dir)
    if (runs := SeedRuns.find(run.path)) is not None:  # a single run there would hide the seeds' runs
        seeds = ",".join(map(str, runs.seeds()))
        raise ConfigError(
            f"{run.path} holds a run over seeds ({', '.join(map(seed_folder, runs.seeds()))}); "
            f"{'resume it with --seeds ' + seeds + ' --resume' if resume else 'choose another name'}, "
            f"or name one seed's folder (--set runs_dir={run.path} --set name=seed-<s> --set seed=<s>)"
        )
    if resume:
        run.load_config()
    elif run.config_file.exists():
        run.create(cfg)  # refuses, saying why
    if not resume:  # a resumed run keeps the settings checked when it began
        check_max_length(cfg)  # before the folder is made: a refused setting leaves nothing to resume
    with FolderLock(run.path, steal=steal_lock):
        cfg = prepare_run(cfg, resume)
        return Loop(cfg, hooks).run()


def train_seeds(
    cfg: RunConfig,
    seeds: list[int],
    resume: bool,
    hooks: Hooks | None = None,
    steal_lock: bool = False,
) -> dict[int, list[RoundRecord]]:
    """``parlay train --seeds``: ``train`` once per seed, one seed after another, each into
    ``cfg.run_dir/seed-<s>/`` with ``seed: s`` (the layout and its checks: ``parlay/seeds.py``).
    Within a seed, ``rollout.workers``/``ray_address`` spread its games over Ray workers as in any
    run; the seeds themselves run in turn. Everything is checked before anything runs
    (``SeedRuns.check_start``); the parent folder's lock is held throughout and each seed's own
    run lock while it runs. With ``resume``, a seed with nothing left to do (``finished``) is
    skipped, never replayed; an interrupted one resumes where it stopped; one not started
    starts. Returns each seed's records."""
    hooks = hooks or Hooks()
    runs = SeedRuns(cfg.run_dir)
    runs.check_start(cfg, seeds, resume)
    check_max_length(cfg)  # before any seed folder or the manifest is written
    out: dict[int, list[RoundRecord]] = {}
    with FolderLock(runs.path, steal=steal_lock):
        listed = runs.seeds() if resume else []
        runs.write_manifest(cfg, listed + [s for s in seeds if s not in listed])
        for seed in seeds:
            mine = runs.config_for(cfg, seed)
            started = RunDir(mine.run_dir).config_file.exists()
            if started and finished(mine):
                hooks.note(f"seed {seed}: complete, not played again")
                out[seed] = RunDir(mine.run_dir).records()
                continue
            hooks.note(f"seed {seed}: {'resuming' if started else 'starting'} in {mine.run_dir}")
            out[seed] = train(mine, started, hooks, steal_lock)
    return out
