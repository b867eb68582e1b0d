"""The ``parlay`` command."""

from __future__ import annotations

import functools
import json
import logging
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from parlay import __version__
from parlay.agents import Agent, AgentError, Sampling, load_agent, load_judge
from parlay.agents.base import TemplateError
from parlay.agents.resolve import expand_rounds
from parlay.config import RolloutConfig, load_config
from parlay.distributed import DistributedError
from parlay.episode import Episode, EpisodeFileError, EpisodeWriter, read_episodes, write_episodes
from parlay.errors import ConfigError, UserError
from parlay.evaluate import compute_metrics
from parlay.evaluate.metrics import format_change
from parlay.evaluate.tables import (
    metrics_table,
    partner_eval_tables,
    partners_table,
    rounds_table,
    seed_tables,
    sweep_table,
    tournament_tables,
)
from parlay.evaluate.tournament import TournamentError
from parlay.games import ContextFileError, Objective, RuleError, objective, read_selfplay_file
from parlay.improve import TrainDataError
from parlay.lewis import LewisFormatError, import_file
from parlay.locking import LockError
from parlay.rollout import plan_games, play_games
from parlay.run import RoundRecord, RunDir, RunDirError
from parlay.seeds import SeedRuns, parse_seeds, pick_seed, seed_folder, seeds_of
from parlay.specs import AgentSpec, RunSpec, parse_spec
from parlay.tracking import TrackingError, track_eval

app = typer.Typer(
    help="parlay: self-play for language-model negotiators in Deal or No Deal.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console()
err = Console(stderr=True)
err.soft_wrap = not err.is_terminal  # a log keeps each line whole (grep finds it), however wide COLUMNS says

USER_ERRORS = (
    UserError,
    RuleError,
    ContextFileError,
    EpisodeFileError,
    AgentError,
    LewisFormatError,
    TrainDataError,
    TournamentError,
    TrackingError,
    RunDirError,
    TemplateError,
    LockError,
    DistributedError,
    FileNotFoundError,
)
F = TypeVar("F", bound=Callable[..., Any])


def user_errors(fn: F) -> F:
    """Report a user's mistake in one line and exit with status 2, without a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except USER_ERRORS as exc:
            err.print(f"[bold red]error:[/] {exc}", highlight=False)
            raise typer.Exit(2) from None

    return wrapper  # type: ignore[return-value]


@app.callback()
def main(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log debug messages.")] = False,
    version: Annotated[bool, typer.Option("--version", help="Print the version and exit.")] = False,
) -> None:
    if version:
        console.print(f"parlay {__version__}")
        raise typer.Exit()
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, handlers=[_log_handler()])


def _log_handler() -> logging.Handler:
    """Rich's handler at a terminal; in a log (stderr not a terminal) one plain line per record,
    never wrapped into columns, so that grep finds a warning whole."""
    if err.is_terminal:
        return RichHandler(console=err, show_path=False)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S"))
    return handler


# ---------------------------------------------------------------------- progress


PROGRESS_EVERY = 30.0
"""Seconds between the plain progress lines written when stderr is not a terminal."""


class RichHooks:
    """Progress for every long command (``parlay.loop.Hooks``): a bar per stage, deals and tokens
    per second while games are played, the loss while training, a table after each round."""

    def __init__(self) -> None:
        self.progress: Progress | None = None
        self.task: Any = None
        self.info = ""
        self.deals = 0
        self.tokens = 0
        self.training = False
        self.started = time.perf_counter()
        self.ticker: threading.Event | None = None
        self.ticker_lock = threading.Lock()  # no ticker line after the stage's last line

    def stage(self, description: str, total: int, started: float | None = None) -> None:
        self.end_stage()
        self.progress = Progress(
            TextColumn("[progress.description]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            console=err,
            disable=not err.is_terminal,
        )
        self.progress.start()
        self.task = self.progress.add_task(description, total=total, info="")
        self.deals, self.tokens, self.training = 0, 0, False
        self.started = time.perf_counter() if started is None else started
        self.info = ""
        self.description, self.total, self.done, self.last_line = description, total, 0, self.started
        if not err.is_terminal:  # a log file gets one line per stage instead of a bar
            err.print(f"{description} ({total})", highlight=False)
            self.ticker = self._tick(PROGRESS_EVERY) if PROGRESS_EVERY > 0 else None

    def advance(self, n: int = 1, **info: Any) -> None:
        if self.progress is None:
            return
        with self.ticker_lock:  # the ticker reads these figures
            self.deals += info.get("deals", 0)
            self.tokens += info.get("tokens", 0)
            self.done += n
            now = time.perf_counter()
            self.training = "loss" in info
            self.info = f"loss {info['loss']:.3f}" if self.training else f"deals {self.deals}"
            self.progress.update(self.task, advance=n, info=f"{self.info}{self.rate(now)}")
            if not err.is_terminal and now - self.last_line >= PROGRESS_EVERY:  # a log: a plain line now and then
                err.print(self.progress_line(now), highlight=False)
                self.last_line = now

    def _tick(self, every: float) -> threading.Event:
        """A line every ``every`` seconds in which nothing else was written (a stage's first
        games can take minutes to end), until the returned event is set."""
        stop = threading.Event()

        def tick() -> None:
            wait = every
            while not stop.wait(wait):
                with self.ticker_lock:
                    now = time.perf_counter()
                    if stop.is_set():
                        return
                    if now - self.last_line >= every:
                        err.print(self.progress_line(now), highlight=False)
                        self.last_line = now
                    wait = max(0.0, every - (now - self.last_line))  # from the last line, whoever wrote it

        threading.Thread(target=tick, name="progress-lines", daemon=True).start()
        return stop

    def rate(self, now: float) -> str:
        """``, 41 tok/s`` since the stage began; nothing where no model tokens were counted (bots)."""
        return f", {self.tokens / max(1e-9, now - self.started):.0f} tok/s" if self.tokens else ""

    def progress_line(self, now: float) -> str:
        """``  round 1: training: 12/32, loss 1.234, 41 tok/s, ETA 6m10s`` (for logs, where no bar is drawn).

        Games are played together and most of them end near the stage's end, so before half of
        them are done neither an ETA nor a token rate drawn from the finished ones means anything
        (at 1 of 160 it read 559 minutes for a 4-minute stage): the line gives the time so far."""
        elapsed = now - self.started
        head = f"  {self.description}: {self.done}/{self.total}" + (f", {self.info}" if self.info else "")
        if not self.training and self.done < self.total / 2:
            return f"{head}, {_minutes(elapsed)} so far"
        left = (self.total - self.done) * elapsed / self.done if self.done else None
        eta = _minutes(left) if left is not None else "unknown"
        return f"{head}{self.rate(now)}, ETA {eta}"

    def end_stage(self) -> None:
        if self.ticker is not None:
            with self.ticker_lock:
                self.ticker.set()
            self.ticker = None
        if self.progress is not None:
            self.progress.stop()
            if not err.is_terminal:
                now = time.perf_counter()
                figures = f"{self.info}{self.rate(now)}{_peak_memory()}".removeprefix(", ")
                done = f"  done in {now - self.started:.0f} s"
                err.print(f"{done}; {figures}" if figures else done, highlight=False)
            self.progress = None

    def game_done(self, ep: Episode) -> None:
        self.advance(deals=int(ep.agreed), tokens=sum(t.tokens or 0 for t in ep.turns))

    def round_done(self, record: RoundRecord, records: list[RoundRecord]) -> None:
        console.print(rounds_table(records))
        partners = partners_table([record])
        if partners is not None:
            console.print(partners)

    def note(self, text: str) -> None:
        err.print(f"[yellow]{text}[/]", highlight=False)


def _peak_memory() -> str:
    """``, peak memory so far 4.3 GB``: the process's peak, so a log shows which stage set it."""
    from parlay.agents.machine import peak_rss_gb

    peak = peak_rss_gb()
    return f", peak memory so far {peak:.1f} GB" if peak is not None else ""


def _minutes(seconds: float) -> str:
    """``6m10s``."""
    return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"


# ---------------------------------------------------------------------- options

ROLLOUT = RolloutConfig()
ObjectiveOpt = Annotated[
    str, typer.Option("--objective", help="cooperative, semi-competitive, competitive, or λ in [-1, 1].")
]
RunObjectiveOpt = Annotated[
    str | None,
    typer.Option(
        "--objective",
        help="cooperative, semi-competitive, competitive, or λ in [-1, 1] (default: the objective the runs "
        "among the agents trained under, when they agree; else semi-competitive).",
    ),
]
GamesOpt = Annotated[int, typer.Option("-n", "--games", min=1, help="Number of games.")]
SeedOpt = Annotated[int, typer.Option(min=0, help="Seed for contexts, first speakers and sampling.")]
OutputOpt = Annotated[Path | None, typer.Option("-o", "--output", help="Write episodes to this JSONL file.")]
ContextsOpt = Annotated[
    Path | None, typer.Option(help="Lewis selfplay.txt-format context file (default: sample uniformly).")
]
CapOpt = Annotated[int, typer.Option(min=1, help="Messages before a game ends without a deal.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the metrics as one JSON object.")]
TempOpt = Annotated[float, typer.Option(min=0.0, help="Sampling temperature of model agents (0 = greedy).")]
TopPOpt = Annotated[float, typer.Option("--top-p", min=0.0, max=1.0, help="Nucleus sampling mass of model agents.")]
MaxTokOpt = Annotated[int, typer.Option("--max-new-tokens", min=1, help="Longest model reply, in tokens.")]
StealOpt = Annotated[
    bool,
    typer.Option(
        "--steal-lock",
        help="Take the folder's lock even though its file is unreadable or names another host (only when you "
        "know that writer is gone).",
    ),
]


# ---------------------------------------------------------------------- play


def _play(
    agent_a: Agent,
    agent_b: Agent,
    n: int,
    obj: Objective,
    seed: int,
    output: Path | None,
    contexts: Path | None,
    max_messages: int,
    as_json: bool,
) -> None:
    games = plan_games(n, seed, read_selfplay_file(contexts) if contexts else None)
    hooks = RichHooks()
    writer = EpisodeWriter(output) if output else None
    hooks.stage(f"{agent_a.spec} vs {agent_b.spec}", n)
    try:
        episodes = play_games(agent_a, agent_b, games, obj, max_messages, writer=writer, on_episode=hooks.game_done)
    finally:
        hooks.end_stage()
        if writer:
            writer.close()
    metrics = compute_metrics(episodes)
    if as_json:
        console.print_json(json.dumps(metrics))
    else:
        console.print(metrics_table(metrics, f"{agent_a.spec} vs {agent_b.spec}, {obj.name}, {n} games"))
    if output:
        err.print(f"episodes written to {output}")


@app.command()
@user_errors
def play(
    a: Annotated[str, typer.Option("--a", help="Agent spec of player A, e.g. bot:hard or hf:smollm2-135m.")] = (
        "bot:hard"
    ),
    b: Annotated[str, typer.Option("--b", help="Agent spec of player B (default: the same agent as A).")] = (
        "bot:conceder"
    ),
    n: GamesOpt = 100,
    objective_spec: RunObjectiveOpt = None,
    seed: SeedOpt = 0,
    output: OutputOpt = None,
    contexts: ContextsOpt = None,
    max_messages: CapOpt = ROLLOUT.max_messages,
    human: Annotated[bool, typer.Option("--human", help="Play side A yourself, in this terminal.")] = False,
    temperature: TempOpt = ROLLOUT.temperature,
    top_p: TopPOpt = ROLLOUT.top_p,
    max_new_tokens: MaxTokOpt = ROLLOUT.max_new_tokens,
    as_json: JsonOpt = False,
) -> None:
    """Play games between two agents and print their metrics (one agent on both sides when A = B)."""
    seats = [b] if human else [a, b]  # with --human, seat A is the person, whatever --a says
    runs = [parse_spec(spec) for spec in dict.fromkeys(seats) if spec.startswith("run:")]
    obj = _objective_for(objective_spec, runs)
    sampling = Sampling(temperature, top_p, max_new_tokens, seed)
    agent_a = load_agent("human" if human else a, sampling)
    agent_b = agent_a if b == a and not human else load_agent(b, sampling)
    try:
        _play(agent_a, agent_b, n, obj, seed, output, contexts, max_messages, as_json)
    finally:
        for agent in {id(agent_a): agent_a, id(agent_b): agent_b}.values():
            agent.close()


@app.command()
@user_errors
def selfplay(
    model: Annotated[str, typer.Option("--model", help="Agent spec that plays both sides.")] = "hf:smollm2-135m",
    n: GamesOpt = 32,
    objective_spec: RunObjectiveOpt = None,
    seed: SeedOpt = 0,
    output: OutputOpt = None,
    contexts: ContextsOpt = None,
    max_messages: CapOpt = ROLLOUT.max_messages,
    temperature: TempOpt = ROLLOUT.temperature,
    top_p: TopPOpt = ROLLOUT.top_p,
    max_new_tokens: MaxTokOpt = ROLLOUT.max_new_tokens,
    as_json: JsonOpt = False,
) -> None:
    """One agent plays both sides of every game (one model load, one batch per step): play --a M --b M."""
    play(
        a=model, b=model, n=n, objective_spec=objective_spec, seed=seed, output=output, contexts=contexts,
        max_messages=max_messages, human=False, temperature=temperature, top_p=top_p,
        max_new_tokens=max_new_tokens, as_json=as_json,
    )  # fmt: skip


# ---------------------------------------------------------------------- evaluation


def _sweep(specs, lambdas, n, seed, out, max_messages, sampling, as_json, steal_lock) -> None:
    """``parlay eval --agents A[,B] --lambdas …``: the same games at each λ, a table and a plot."""
    from parlay.evaluate.sweep import play_sweep

    out = out or Path("eval") / f"sweep-n{n}-seed{seed}"
    hooks = RichHooks()
    try:
        result = play_sweep(
            specs, lambdas, n, seed, out, max_messages, sampling, steal_lock, hooks.stage, hooks.game_done
        )
    finally:
        hooks.end_stage()
    if as_json:
        console.print_json(json.dumps(result))
        return
    console.print(sweep_table(result))
    err.print(f"sweep written to {out}/sweep.json and sweep.png")


def _read_all(files: list[Path]) -> list[Episode]:
    episodes = []
    for path in files:
        got = read_episodes(path)  # a torn last line is skipped and logged there
        if not got:
            raise EpisodeFileError(f"{path}: no episodes in this file")
        episodes += got
    return episodes


def _lambdas(text: str) -> list[float]:
    """``--lambdas 1,0.5,0``: the values of λ, each in [-1, 1]."""
    try:
        values = [objective(float(x)).lam for x in text.split(",") if x.strip()]
    except (ValueError, RuleError) as exc:
        raise ConfigError(f"--lambdas: expected numbers in [-1, 1] separated by commas ({exc})") from None
    if not values:
        raise ConfigError("--lambdas: no value given")
    return values


def _specs(text: str | None, option: str = "--agents") -> list[AgentSpec]:
    """``--agents A,B,…`` (or ``option``): the agent specs, parsed here, where they enter."""
    try:
        specs = [parse_spec(s.strip()) for s in (text or "").split(",") if s.strip()]
    except UserError as exc:
        raise ConfigError(f"{option}: {exc}") from None
    if not specs:
        raise ConfigError(f"{option}: no agent spec given")
    seen: set[str] = set()
    for spec in specs:
        if spec.render() in seen:
            raise ConfigError(f"{option}: {spec.render()} given twice; name each agent once")
        seen.add(spec.render())
    return specs


def _objective_for(given: str | None, specs: list[AgentSpec]) -> Objective:
    """``--objective`` when given; else the objective the runs among ``specs`` (``run:DIR@K``, a
    run over seeds included) trained under, when they agree, said on stderr; else semi-competitive
    (the Lewis et al. game's), with a warning when the runs disagree."""
    if given is not None:
        return objective(given)
    trained: dict[float, Objective] = {}
    for spec in specs:
        for one in expand_rounds(spec):
            if isinstance(one, RunSpec):
                obj = objective(RunDir(one.path).load_config().objective)
                trained[obj.lam] = obj
    if len(trained) == 1:
        (obj,) = trained.values()
        err.print(f"objective: {obj.name}, the runs' own (--objective to choose another)", highlight=False)
        return obj
    if trained:
        names = ", ".join(sorted(o.name for o in trained.values()))
        err.print(f"[yellow]the runs trained under different objectives ({names}): playing semi-competitive; "
                  "--objective to choose[/]", highlight=False)  # fmt: skip
    return objective("semi-competitive")


@app.command("eval")
@user_errors
def eval_(
    files: Annotated[list[Path] | None, typer.Argument(help="Episodes JSONL file(s) to summarise.")] = None,
    agents: Annotated[
        str | None,
        typer.Option(
            "--agents",
            help="Comma-separated agent specs for a cross-play tournament; run:DIR[@K] is round K's model "
            "of a run (default: its last complete round), run:DIR@all every complete round's.",
        ),
    ] = None,
    partners: Annotated[
        str | None,
        typer.Option(
            "--partners",
            help="Comma-separated partner specs: instead of a tournament, each of --agents plays each "
            "partner on the same games (both seats), with its paired change from the first agent; "
            "run:RUN@K of a run over seeds plays every seed's model, figures across seeds.",
        ),
    ] = None,
    n: GamesOpt = 64,
    objective_spec: RunObjectiveOpt = None,
    seed: SeedOpt = 0,
    max_messages: CapOpt = ROLLOUT.max_messages,
    temperature: TempOpt = ROLLOUT.temperature,
    top_p: TopPOpt = ROLLOUT.top_p,
    max_new_tokens: MaxTokOpt = ROLLOUT.max_new_tokens,
    out: Annotated[
        Path | None,
        typer.Option("--out", help="Tournament folder (default: eval/<objective>-n<N>-seed<S>); rerun to resume."),
    ] = None,
    judge: Annotated[
        str | None, typer.Option("--judge", help="Agent spec that also checks messages for misstated facts.")
    ] = None,
    judge_limit: Annotated[int, typer.Option(min=1, help="Most messages the judge checks.")] = 200,
    track: Annotated[
        str | None, typer.Option("--track", help="Also log eval/ metrics to: tensorboard, wandb (comma-separated).")
    ] = None,
    as_json: JsonOpt = False,
    steal_lock: StealOpt = False,
    workers: Annotated[
        int, typer.Option("--workers", min=0, help="Ray actors that play the tournament (pip install 'parlay[ray]').")
    ] = 0,
    ray_address: Annotated[
        str | None, typer.Option("--ray-address", help="A running Ray cluster (default: a local one).")
    ] = None,
    lambdas: Annotated[
        str | None,
        typer.Option(
            "--lambdas",
            help="A λ sweep instead of a tournament: --agents A[,B] play the same games at each λ "
            "(comma-separated, e.g. 1,0.5,0,-0.5,-1); sweep.json and sweep.png in --out.",
        ),
    ] = None,
) -> None:
    """Metrics with 95% intervals of episode FILES, a cross-play tournament of --agents, or with
    --lambdas a sweep of the objective (one writer per output folder)."""
    from parlay.evaluate import summarize
    from parlay.evaluate.consistency import judge_summary

    if bool(files) == bool(agents):
        raise ConfigError("give either episodes FILES or --agents SPEC,SPEC,… (not both)")
    if partners is not None:
        if lambdas is not None or judge:
            raise ConfigError("--partners: not with --lambdas or --judge")
        agent_specs, partner_specs = _specs(agents), _specs(partners, "--partners")
        obj = _objective_for(objective_spec, agent_specs + partner_specs)
        _eval_partners(agent_specs, partner_specs, n, obj, seed, out, max_messages,
                       Sampling(temperature, top_p, max_new_tokens, seed), as_json, steal_lock, workers,
                       ray_address)  # fmt: skip
        return
    obj = _objective_for(objective_spec, _specs(agents) if agents and lambdas is None else [])
    judge_agent = load_judge(judge, seed) if judge else None  # a bad judge spec fails before any game
    sampling = Sampling(temperature, top_p, max_new_tokens, seed)
    if files:
        episodes = _read_all(files)
        summary = summarize(episodes, seed=seed)
        result = summary["metrics"] | {"ci95": summary["ci95"]}
    elif lambdas is not None:
        _sweep(_specs(agents), _lambdas(lambdas), n, seed, out, max_messages, sampling, as_json, steal_lock)
        return
    else:
        from parlay.evaluate.tournament import play_tournament, tournament_episodes

        specs = [one for spec in _specs(agents) for one in expand_rounds(spec)]
        out = out or Path("eval") / f"{obj.name}-n{n}-seed{seed}"
        hooks = RichHooks()
        try:
            result = play_tournament(
                specs, obj, n, seed, out, max_messages, sampling, workers, ray_address, steal_lock,
                on_start=lambda total, done: (hooks.stage(f"tournament of {len(specs)} agents", total),
                                              hooks.advance(done)),
                on_episode=hooks.game_done,
            )  # fmt: skip
        finally:
            hooks.end_stage()
        episodes = None
    if judge_agent is not None:
        try:
            if episodes is None:  # the tournament's games, read back from its folder
                episodes = tournament_episodes(out, result)
            result["judge_consistency"] = judge_summary(judge_agent, episodes, seed=seed, limit=judge_limit)
        finally:
            judge_agent.close()
    if track:
        track_eval(track, out or Path("eval"), result)
    if as_json:
        console.print_json(json.dumps(result))
    elif files:
        console.print(metrics_table(result, ", ".join(map(str, files)), result["ci95"]))
    else:
        for table in tournament_tables(result):
            console.print(table)
        err.print(f"tournament written to {out}/tournament.json and tournament.csv")
    if judge_agent is not None and not as_json:
        j = result["judge_consistency"]
        rate = "n/a" if j["inconsistency_rate"] is None else f"{j['inconsistency_rate']:.1%}"
        agree = "n/a" if j["agreement_with_rules"] is None else f"{j['agreement_with_rules']:.1%}"
        console.print(
            f"judge {j['judge']}: {rate} of {j['messages']} messages misstate facts "
            f"({j['unreadable']} unreadable); agrees with the rules on {agree}"
        )


def _eval_partners(
    agents: list[AgentSpec], partners: list[AgentSpec], n: int, obj: Objective, seed: int, out: Path | None,
    max_messages: int | None, sampling: Sampling, as_json: bool, steal_lock: bool, workers: int,
    ray_address: str | None,
) -> None:  # fmt: skip
    """``parlay eval --agents … --partners …``: ``evaluate/partners.py``, its tables or ``--json``."""
    from parlay.evaluate.partners import play_partners

    out = out or Path("eval") / f"partners-{obj.name}-n{n}-seed{seed}"
    hooks = RichHooks()
    try:
        result = play_partners(
            agents, partners, obj, n, seed, out, max_messages, sampling, workers, ray_address, steal_lock,
            on_start=lambda total, done: (hooks.stage("agents with fixed partners", total), hooks.advance(done)),
            on_episode=hooks.game_done,
        )  # fmt: skip
    finally:
        hooks.end_stage()
    if as_json:
        console.print_json(json.dumps(result))
        return
    for table in partner_eval_tables(result):
        console.print(table)
    err.print(f"written to {out}/result.json")


@app.command("import-lewis")
@user_errors
def import_lewis(
    file: Annotated[Path, typer.Argument(help="A Lewis et al. 2017 train/val/test.txt-format file.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Episodes JSONL to write.")],
) -> None:
    """Import human Deal or No Deal dialogues as semi-competitive episodes."""
    result = import_file(file)
    for label, items in (
        ("lines that could not be read", [f"line {n}: {why}" for n, why in result.bad_lines]),
        ("lines whose other side is missing", [f"line {n}" for n in result.unpaired]),
    ):
        if items:
            err.print(f"[yellow]{len(items)} {label}[/]; first: " + "; ".join(items[:3]), highlight=False)
    if not result.episodes:
        raise LewisFormatError(f"{file}: no dialogue could be imported")
    write_episodes(output, result.episodes)
    err.print(f"{len(result.episodes)} dialogues written to {output}")


# ---------------------------------------------------------------------- training

SetOpt = Annotated[
    list[str] | None, typer.Option("--set", help="Override a config key: --set rollout.games=32 (repeatable).")
]


@app.command("train")
@user_errors
def train_cmd(
    config: Annotated[Path | None, typer.Option("--config", "-c", help="Run config (YAML).")] = None,
    overrides: SetOpt = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue the run in runs_dir/name where it stopped.")
    ] = False,
    init_data: Annotated[
        Path | None, typer.Option("--init-data", help="Episodes to fine-tune the starting model on first.")
    ] = None,
    steal_lock: StealOpt = False,
    seeds: Annotated[
        str | None,
        typer.Option(
            "--seeds",
            help="Run the config once per seed, one after another, e.g. 0,1,2: each into runs_dir/name/seed-<s>/ "
            "(the config key seeds: does the same); --resume skips complete seeds.",
        ),
    ] = None,
) -> None:
    """Self-play rounds: play, keep the good games, fine-tune, play again. One writer per run: a
    second `parlay train` on a live run is refused."""
    from parlay.evaluate.report import write_report
    from parlay.loop import train

    cfg = load_config(config, overrides)
    if init_data is not None:
        if not init_data.exists():
            raise FileNotFoundError(f"{init_data}: no such episodes file")
        cfg.warm_start.episodes, cfg.warm_start.bots = str(init_data), None
    seed_list = seeds_of(cfg, parse_seeds(seeds) if seeds is not None else None)
    if seed_list is not None:
        _train_seeds(cfg, seed_list, resume, steal_lock)
        return
    run_dir = RunDir(cfg.run_dir)
    started = time.perf_counter()
    hooks = RichHooks()
    err.print(f"run directory: {run_dir.path}")
    _machine_line(cfg)
    try:
        records = train(cfg, resume, hooks, steal_lock)
    finally:
        hooks.end_stage()
    if records and records[-1].vs_round0:
        last, vs = records[-1], records[-1].vs_round0
        console.print(
            f"round {last.round} vs round 0 on the same {vs['games']} games: mean reward "
            f"{vs['mean']:+.2f}, 95% CI [{vs['ci95'][0]:+.2f}, {vs['ci95'][1]:+.2f}]"
        )
        for spec, figures in (last.heldout or {}).items():
            if figures.get("vs_round0"):
                console.print(f"  with held-out partner {spec}: {format_change(figures['vs_round0'])}")
    err.print(f"done in {(time.perf_counter() - started) / 60:.1f} min; metrics in {run_dir.metrics_file}")
    if records:
        path, _ = write_report(run_dir.path, seed=cfg.seed, steal_lock=steal_lock)
        err.print(f"report: {path}")


def _train_seeds(cfg: Any, seeds: list[int], resume: bool, steal_lock: bool) -> None:
    """``parlay train --seeds``: every seed's run in turn (``loop.train_seeds``), each seed's report,
    then the figures across seeds and the report of the whole."""
    from parlay.evaluate.report import write_report
    from parlay.loop import train_seeds

    started = time.perf_counter()
    hooks = RichHooks()
    err.print(f"run directory: {cfg.run_dir} (seeds {', '.join(map(str, seeds))})")
    _machine_line(cfg)
    try:
        done = train_seeds(cfg, seeds, resume, hooks, steal_lock)
    finally:
        hooks.end_stage()
    err.print(f"done in {(time.perf_counter() - started) / 60:.1f} min")
    for seed, records in done.items():
        if records:
            write_report(Path(cfg.run_dir) / seed_folder(seed), seed=seed, steal_lock=steal_lock)
    path, view = write_report(Path(cfg.run_dir), seed=cfg.seed, steal_lock=steal_lock)
    for table in seed_tables(view.changes, view.seeds):
        console.print(table)
    err.print(f"report: {path}")


def _machine_line(cfg) -> None:
    """The machine a run's figures hold for, at the start of its log (``parlay doctor`` says more)."""
    from parlay.agents.hf_layer import default_device, pick_dtype
    from parlay.agents.machine import describe

    machine = describe()
    play, train = (
        str(pick_dtype(d, default_device())).removeprefix("torch.") for d in (cfg.rollout.dtype, cfg.train.dtype)
    )
    dtypes = f"dtype {play}" if play == train else f"dtype {play} for play, {train} for training"
    estimate = "parlay doctor estimates the main job's time here"
    err.print(f"machine: {machine.summary()}; this run: {dtypes} ({estimate})", highlight=False)
    for line in machine.warnings():
        err.print(f"[yellow]{line}[/]", highlight=False)


@app.command()
@user_errors
def sft(
    data: Annotated[Path, typer.Argument(help="train.jsonl: kept player-episodes with weights.")],
    model: Annotated[str, typer.Option("--model", help="Base model: name, hub id or path.")],
    out: Annotated[Path, typer.Option("--out", help="Where to save the adapter or weights.")],
    adapter: Annotated[str | None, typer.Option("--adapter", help="LoRA adapter to continue training.")] = None,
    config: Annotated[Path | None, typer.Option("--config", "-c", help="Config whose train/weights apply.")] = None,
    overrides: SetOpt = None,
    epochs: Annotated[float | None, typer.Option(help="Passes over the data (default: train.epochs).")] = None,
    lr: Annotated[float | None, typer.Option(help="Learning rate (default: train.lr).")] = None,
    seed: Annotated[
        int | None, typer.Option(min=0, help="Seed of initialisation and order (default: the config's).")
    ] = None,
    stats: Annotated[Path | None, typer.Option("--stats", help="Write the training figures here.")] = None,
    resume: Annotated[
        bool,
        typer.Option(
            "--resume",
            help="Continue from OUT's checkpoint (train.checkpoint_steps) when an interrupted call with the same "
            "data and settings left one; without it, training starts over.",
        ),
    ] = False,
) -> None:
    """Fine-tune on a train.jsonl file; runs unchanged under `accelerate launch -m parlay sft …`."""
    from accelerate import PartialState

    from parlay.improve.examples import read_examples
    from parlay.improve.sft import save_stats, train

    cfg = load_config(config, overrides)
    result = train(
        read_examples(data), model, out, cfg.train, adapter=adapter, weights=cfg.weights,
        seed=cfg.seed if seed is None else seed, epochs=epochs, lr=lr, resume=resume,
    )  # fmt: skip
    if PartialState().is_main_process:
        if stats:
            save_stats(stats, result)
        console.print(
            f"{result.steps} steps on {result.examples} examples: loss {result.loss_first:.3f} → "
            f"{result.loss_last:.3f}, {result.tokens_per_second:.0f} tok/s; saved to {out}"
        )


@app.command()
@user_errors
def export(
    source: Annotated[Path, typer.Argument(help="An episodes JSONL file, or a run directory.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="File to write (a folder for --format hf).")],
    fmt: Annotated[
        str,
        typer.Option(
            "--format",
            help="openai (chat fine-tuning JSONL), train (train.jsonl lines), jsonl (rows with rewards), "
            "or hf (a datasets folder).",
        ),
    ] = "openai",
    keep: Annotated[
        str | None,
        typer.Option(
            help="Filter rule: all, above_mean, nonzero, agreed, top_fraction, threshold (default: all for a "
            "file; a run's own filter and weights for a run directory)."
        ),
    ] = None,
    round_k: Annotated[
        int | None,
        typer.Option("--round", min=1, help="Run directory only: exactly what round K trained on (its train.jsonl)."),
    ] = None,
    seed: Annotated[
        int | None, typer.Option("--seed", help="A run over seeds: export seed S's run (its seed-<S>/ folder).")
    ] = None,
) -> None:
    """Training examples, selected as a round selects them: OpenAI chat fine-tuning JSONL, train.jsonl
    lines, plain JSONL with rewards, or a Hugging Face dataset (load it with datasets.load_from_disk)."""
    from parlay.improve import export as exporting

    sources = exporting.sources(pick_seed(source, seed), keep, round_k)
    n = exporting.export(sources, output, fmt)
    err.print(f"{n} examples from {len(sources)} file(s) written to {output}")


@app.command()
@user_errors
def report(
    run_dir: Annotated[
        Path, typer.Argument(help="A run directory (runs/<name>), or a run over seeds (its seed-<s>/ read as one).")
    ],
    seed: Annotated[int, typer.Option(min=0, help="Seed of the bootstrap intervals.")] = 0,
    judge: Annotated[
        str | None,
        typer.Option("--judge", help="Agent spec that also checks messages for misstated facts."),
    ] = None,
    judge_limit: Annotated[int, typer.Option(min=1, help="Most messages the judge checks per round.")] = 100,
    steal_lock: StealOpt = False,
) -> None:
    """Write RUN_DIR/report.html (self-contained) and RUN_DIR/plots/*.png; a live run can be reported.
    A run over seeds gets every round-vs-round-0 change per seed and across seeds, with intervals
    over seeds and games (here as tables, and in its report)."""
    from parlay.evaluate.report import write_report
    from parlay.evaluate.seeds import SeedsView

    if judge and (runs := SeedRuns.find(run_dir)) is not None:
        example = runs.run(runs.seeds()[0]).path
        raise ConfigError(f"--judge: {run_dir} is a run over seeds; judge one seed's run (e.g. {example})")

    judge_agent = load_judge(judge, seed) if judge else None
    try:
        path, view = write_report(run_dir, seed=seed, judge=judge_agent, judge_limit=judge_limit, steal_lock=steal_lock)
    finally:
        if judge_agent is not None:
            judge_agent.close()
    for line in view.missing:
        err.print(f"[yellow]missing:[/] {line}", highlight=False)
    if isinstance(view, SeedsView):
        for table in seed_tables(view.changes, view.seeds):
            console.print(table)
    err.print(f"report written to {path} (plots in {RunDir(run_dir).plots})")


@app.command()
@user_errors
def doctor(
    seconds: Annotated[float, typer.Option(min=0.5, help="How long to measure the matmul rate.")] = 10.0,
    dtype_name: Annotated[
        str,
        typer.Option(
            "--dtype",
            help="The dtype to measure and estimate for: auto (what runs pick), float32 (e.g. the AVX2 class's "
            "path on a bf16 machine), bf16.",
        ),
    ] = "auto",
) -> None:
    """What this machine computes with (CPU class, native bf16, the dtype `auto` picks, threads),
    its measured matmul rate, and the README main job's expected time here."""
    import torch

    from parlay.agents.hf_layer import pick_dtype
    from parlay.agents.machine import QUICKSTART, calibrate, describe, expected_minutes

    machine = describe()
    dtype = pick_dtype(dtype_name, "cuda" if machine.gpu else "cpu")  # auto: machine.auto_dtype
    if dtype == torch.float16 and not machine.gpu:  # emulated on CPUs: one calibration matmul takes a minute
        raise typer.BadParameter(
            "a CPU computes float16 by emulation: measure auto, float32 or bf16", param_hint="--dtype"
        )
    console.print(machine.summary(), highlight=False)
    if not machine.gpu and not machine.native_bf16:
        console.print("bf16 would be emulated on this CPU (slow): runs train and play in float32", highlight=False)
    flops = calibrate(dtype, seconds)
    console.print(f"matmul {flops / 1e9:.0f} GFLOP/s in {str(dtype).removeprefix('torch.')} ({seconds:g} s)")
    reference = QUICKSTART.get(str(dtype).removeprefix("torch."))
    if machine.gpu:  # the references are CPU runs: a GPU's time does not scale from them
        console.print("main job: no estimate on a GPU (its measured references are CPU runs)", highlight=False)
        reference = None
    minutes = expected_minutes(flops, reference)
    if reference is not None and minutes is not None:
        console.print(
            f"main job (configs/cpu-quickstart.yaml): about {minutes:.0f} min here, scaled from "
            f"{reference.minutes:.0f} min at {reference.gflops:.0f} GFLOP/s {reference.dtype} "
            f"({reference.machine}, commit {reference.commit})",
            highlight=False,
        )
    for line in machine.warnings():
        err.print(f"[yellow]{line}[/]", highlight=False)


# ---------------------------------------------------------------------- human studies

study_app = typer.Typer(help="Human studies: participant tokens and exports (the server is parlay serve).")
app.add_typer(study_app, name="study")

StudyOpt = Annotated[Path | None, typer.Option("--study", help="Study file (YAML): conditions, design, bonus.")]
AgentsOpt = Annotated[
    str | None, typer.Option("--agent", help="Without a study file: the agents to compare, comma-separated specs.")
]
DbOpt = Annotated[str, typer.Option("--db", help="SQLAlchemy database URL of the study.")]
DEFAULT_DB = "sqlite:///parlay-study.db"


def _study(study_file: Path | None, agents: str | None, objective_spec: str, games: int | None) -> Any:
    from parlay.web.study import load_study, study_from_flags

    if study_file is not None:
        if agents or games:
            raise ConfigError("with --study, the study file says the agents and games (not --agent or --games)")
        return load_study(study_file)
    if not agents:
        raise ConfigError("give a study file (--study) or the agents to compare (--agent SPEC[,SPEC…])")
    extra = {"games_per_participant": games} if games else {}
    return study_from_flags([a.strip() for a in agents.split(",") if a.strip()], objective_spec, **extra)


def _links(store: Any, study: Any, n: int, base_url: str, out: Path | None) -> None:
    made = store.add_participants(study, n)
    lines = ["number,token,link", *(f"{k},{t},{base_url.rstrip('/')}/play#token={t}" for k, t in made)]
    if out is not None:
        out.write_text("\n".join(lines) + "\n", encoding="utf-8")
        err.print(f"{n} participant links written to {out} (only their hashes are stored: keep this file)")
    else:
        for line in lines[1:]:
            console.print(line.split(",", 2)[2], highlight=False, soft_wrap=True)


@app.command()
@user_errors
def serve(
    agents: AgentsOpt = None,
    objective_spec: ObjectiveOpt = "semi-competitive",
    study_file: StudyOpt = None,
    db: DbOpt = DEFAULT_DB,
    host: Annotated[str, typer.Option(help="Address to listen on (loopback by default).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    games: Annotated[int | None, typer.Option("--games", min=1, help="Games per participant (no study file).")] = None,
    participants: Annotated[
        int, typer.Option("--participants", min=0, help="Make this many participant links at start and print them.")
    ] = 0,
    temperature: TempOpt = ROLLOUT.temperature,
    max_new_tokens: MaxTokOpt = ROLLOUT.max_new_tokens,
    check: Annotated[
        bool,
        typer.Option(help="Before serving, play 4 trial games of each model against bot:conceder; warn if all abort."),
    ] = True,
) -> None:
    """Serve a human study: people play the models in their browsers (see README, 'Running a study').

    The admin token comes from $PARLAY_ADMIN_TOKEN, or is made and printed once at start."""
    import os

    import uvicorn

    from parlay.agents.base import ModelAgent
    from parlay.web.app import create_app
    from parlay.web.checks import check_agents
    from parlay.web.hub import trial
    from parlay.web.store import Store, new_token

    study = _study(study_file, agents, objective_spec, games)
    specs = sorted({c.agent for c in study.conditions})
    if "human" in specs:
        raise ConfigError("'human' cannot be a study's partner: the participants are the humans")
    for note in check_agents(study):  # before anything of the study is stored
        err.print(f"checked {note}", highlight=False, soft_wrap=True)
    store = Store(db)
    loaded: dict[str, Agent] = {}
    try:
        store.check_writable(study.name)  # a database that cannot be written is refused before anything loads
        for spec in specs:
            err.print(f"loading {spec} …")
            loaded[spec] = load_agent(spec, Sampling(temperature=temperature, max_new_tokens=max_new_tokens))
        for spec, objective_name in sorted({(c.agent, c.objective) for c in study.conditions}):
            if check and isinstance(loaded[spec], ModelAgent):
                err.print(f"trial games: {spec} ({objective_name}) …")
                if warning := trial(loaded[spec], objective_name, study.max_messages):
                    err.print(f"[bold red]warning[/]: {warning}", soft_wrap=True)
        admin_token = os.environ.get("PARLAY_ADMIN_TOKEN") or new_token()
        base = f"http://{host}:{port}"
        app_ = create_app(study, store, loaded, admin_token)  # the one place the study is stored or checked
        if participants:
            _links(store, study, participants, base, None)
        if not os.environ.get("PARLAY_ADMIN_TOKEN"):
            err.print(f"admin page: {base}/admin#token={admin_token}", highlight=False, soft_wrap=True)
        uvicorn.run(app_, host=host, port=port, log_level="warning")
    finally:
        for agent in loaded.values():
            agent.close()
        store.close()


@study_app.command("tokens")
@user_errors
def study_tokens(
    n: Annotated[int, typer.Option("-n", min=1, help="Participants to add.")] = 10,
    study_file: StudyOpt = None,
    agents: AgentsOpt = None,
    objective_spec: ObjectiveOpt = "semi-competitive",
    games: Annotated[int | None, typer.Option("--games", min=1, help="Games per participant (no study file).")] = None,
    db: DbOpt = DEFAULT_DB,
    base_url: Annotated[str, typer.Option(help="Where participants reach the server.")] = "http://127.0.0.1:8000",
    out: Annotated[Path | None, typer.Option("--out", help="CSV of number, token and link (default: print links).")] = (
        None
    ),
) -> None:
    """Add participants to a study and give their personal links (each shown once: only hashes are stored)."""
    from parlay.web.checks import check_agents
    from parlay.web.store import Store

    study = _study(study_file, agents, objective_spec, games)
    for note in check_agents(study):  # before anything of the study is stored
        err.print(f"checked {note}", highlight=False, soft_wrap=True)
    store = Store(db)
    try:
        _links(store, study, n, base_url, out)
    finally:
        store.close()


@study_app.command("export")
@user_errors
def study_export(
    output: Annotated[Path, typer.Option("--out", help="Episodes JSONL of every finished game (self-play schema).")],
    study_file: StudyOpt = None,
    agents: AgentsOpt = None,
    objective_spec: ObjectiveOpt = "semi-competitive",
    games: Annotated[int | None, typer.Option("--games", min=1, help="Games per participant (no study file).")] = None,
    db: DbOpt = DEFAULT_DB,
    csv: Annotated[Path | None, typer.Option("--csv", help="Also one CSV row per game (live ones included).")] = None,
) -> None:
    """Export a study's games: Episodes JSONL (for parlay eval/report and warm_start.episodes) and CSV."""
    from parlay.web import results
    from parlay.web.store import Store

    study = _study(study_file, agents, objective_spec, games)
    store = Store(db)
    try:
        episodes = results.episodes(store, study)
        write_episodes(output, episodes)
        err.print(f"{len(episodes)} finished games written to {output}")
        if csv is not None:
            csv.write_text(results.export_csv(store, study), encoding="utf-8")
            err.print(f"games table written to {csv}")
    finally:
        store.close()


# ---------------------------------------------------------------------- human proxies

proxy_app = typer.Typer(help="Human proxies: partners cloned from people's games, and how human-like they are.")
app.add_typer(proxy_app, name="proxy")


class _ProxyProgress:
    """The build's stages as progress bars: games to play, then training steps (counted at the first)."""

    def __init__(self, hooks: RichHooks) -> None:
        self.hooks, self.label, self.total = hooks, "", 0

    def stage(self, label: str, units: int) -> None:
        self.label, self.total = label, units
        if units:
            self.hooks.stage(label, units)
        else:
            self.hooks.end_stage()

    def step(self, done: int, total: int, loss: float, tokens: int) -> None:
        if total != self.total:
            self.total = total
            self.hooks.stage(self.label, total)
        self.hooks.advance(1, loss=loss, tokens=tokens)


@proxy_app.command("build")
@user_errors
def proxy_build(
    episodes: Annotated[Path, typer.Option("--episodes", help="People's games: parlay import-lewis or study export.")],
    out: Annotated[Path, typer.Option("--out", help="The proxy's folder (proxy.json, model/).")],
    model: Annotated[
        str | None, typer.Option("--model", help="Base model (default: --init's, else smollm2-135m).")
    ] = None,
    init: Annotated[
        str | None,
        typer.Option(
            help="Start from a model that knows the protocol: run:DIR@K or an adapter folder (no warm start)."
        ),
    ] = None,
    config: Annotated[
        Path | None, typer.Option("--config", "-c", help="Run config whose train/warm_start apply.")
    ] = None,
    overrides: SetOpt = None,
    sides: Annotated[str, typer.Option(help="Seats imitated: auto (the people's), AB, A or B.")] = "auto",
    keep: Annotated[str, typer.Option(help="Games learned from: all, or agreed (deals only).")] = "all",
    warm: Annotated[
        bool, typer.Option("--warm-start/--no-warm-start", help="Imitate bot deals first (when no --init).")
    ] = True,
    epochs: Annotated[
        float | None, typer.Option(help="Passes over the people's games (default: train.epochs).")
    ] = None,
    lr: Annotated[float | None, typer.Option(help="Learning rate (default: train.lr).")] = None,
    select: Annotated[
        bool,
        typer.Option("--select/--no-select", help="Proposals' counts chosen by the selection step, or sampled."),
    ] = True,
) -> None:
    """Fine-tune a human proxy by behaviour cloning on people's games, and record what it learned from."""
    from parlay.improve.proxy import DEFAULT_WARM_START, build_proxy, default_config

    cfg = load_config(config, overrides) if config else default_config(overrides)
    ws = cfg.warm_start if cfg.warm_start.enabled else DEFAULT_WARM_START
    hooks = RichHooks()
    progress = _ProxyProgress(hooks)
    try:
        manifest = build_proxy(
            episodes, out, cfg, base=model, init=init, sides=sides, keep=keep, warm_start=ws if warm else None,
            epochs=epochs, lr=lr, select=select, on_stage=progress.stage, on_step=progress.step,
        )  # fmt: skip
    finally:
        hooks.end_stage()
    console.print(
        f"proxy of {manifest.examples} people's sides (A {manifest.side_counts.get('A', 0)}, "
        f"B {manifest.side_counts.get('B', 0)}) from {manifest.games} games ({manifest.agreed_games} agreed) "
        f"on {manifest.base}: loss {manifest.train_stats['loss_first']:.3f} → "
        f"{manifest.train_stats['loss_last']:.3f}; saved to {out} (use it as proxy:{out})",
        highlight=False,
    )


@proxy_app.command("check")
@user_errors
def proxy_check(
    proxy: Annotated[Path, typer.Argument(help="The proxy's folder (parlay proxy build --out).")],
    episodes: Annotated[Path, typer.Option("--episodes", help="Held human games the proxy never saw.")],
    games: Annotated[
        int | None, typer.Option("-n", "--games", min=1, help="Check on the first N (default all).")
    ] = None,
    max_messages: CapOpt = 20,
    temperature: TempOpt = 0.7,
    max_new_tokens: MaxTokOpt = ROLLOUT.max_new_tokens,
    seed: SeedOpt = 0,
    select: Annotated[
        bool | None,
        typer.Option("--select/--no-select", help="Play with the selection step or without (default: as built)."),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """How human-like a proxy is: likelihood of people's turns, deals with itself, replies accepted."""
    from parlay.evaluate.proxy import check_proxy
    from parlay.evaluate.tables import proxy_check_table
    from parlay.proxy import MIN_ACCEPTED, ProxyDir

    sampling = Sampling(temperature=temperature, max_new_tokens=max_new_tokens, seed=seed)
    check = check_proxy(
        proxy, episodes, sampling=sampling, max_messages=max_messages, games=games, seed=seed, select=select
    )
    if as_json:
        console.print_json(check.model_dump_json())
    else:
        console.print(proxy_check_table(check, f"proxy:{proxy}"))
    if check.acceptance < MIN_ACCEPTED and not ProxyDir(proxy).own_setting(check):
        how = "selected" if check.select else "sampled"
        raise UserError(
            f"proxy:{proxy}: the protocol rejected {1 - check.acceptance:.0%} of its replies with proposals {how}; "
            "that is not the setting it plays with, so this check (filed apart) does not refuse it"
        )
    if check.acceptance < MIN_ACCEPTED:
        raise UserError(
            f"proxy:{proxy}: the protocol rejected {1 - check.acceptance:.0%} of its replies, so it cannot stand in "
            "for people (it is refused as a partner while this is its last check); rebuild it from a model that "
            "knows the protocol (--init run:DIR@0, or the default warm start) or with more --epochs"
        )


def run() -> None:
    """Entry point; keeps a Ctrl-C quiet."""
    try:
        app()
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)
