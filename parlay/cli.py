"""The ``parlay`` command."""

from __future__ import annotations

import functools
import json
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from parlay import __version__
from parlay.agents import Agent, AgentError, Sampling, load_agent
from parlay.config import ConfigError, load_config
from parlay.episode import Episode, EpisodeFileError, EpisodeWriter, read_episodes, write_episodes
from parlay.evaluate import compute_metrics
from parlay.evaluate.analysis import RunDirError
from parlay.evaluate.metrics import LABELS, format_change
from parlay.evaluate.tournament import TournamentError
from parlay.games import ContextFileError, Objective, RuleError, objective, read_selfplay_file
from parlay.improve import TrainDataError
from parlay.lewis import LewisFormatError, import_file
from parlay.protocol import DEFAULT_MAX_MESSAGES
from parlay.rollout import plan_games, play_games
from parlay.tracking import TrackingError

app = typer.Typer(
    help="parlay: self-play for language-model negotiators in Deal or No Deal.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console()
err = Console(stderr=True)

USER_ERRORS = (
    RuleError,
    ContextFileError,
    EpisodeFileError,
    AgentError,
    LewisFormatError,
    ConfigError,
    TrainDataError,
    TournamentError,
    TrackingError,
    RunDirError,
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
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(message)s",
        handlers=[RichHandler(console=err, show_path=False)],
    )


METRIC_ROWS = [(name, label, fmt) for name, (label, _, fmt) in LABELS.items()]


def metrics_table(metrics: dict[str, Any], title: str, ci95: dict[str, list[float]] | None = None) -> Table:
    table = Table(title=title, show_header=bool(ci95), title_justify="left")
    table.add_column("metric")
    table.add_column("value", justify="right")
    if ci95:
        table.add_column("95% CI", justify="right")
    for key, label, fmt in METRIC_ROWS:
        row = [label, fmt.format(metrics[key])]
        if ci95:
            low, high = ci95.get(key, (None, None))
            row.append("" if low is None else f"[{fmt.format(low)}, {fmt.format(high)}]")
        table.add_row(*row)
    return table


def _progress() -> Progress:
    return Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("deals {task.fields[deals]}"),
        TextColumn("{task.fields[tps]:.0f} tok/s"),
        TimeElapsedColumn(),
        console=err,
        disable=not err.is_terminal,
    )


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
    ctxs = read_selfplay_file(contexts) if contexts else None
    games = plan_games(n, seed, ctxs)
    writer = EpisodeWriter(output) if output else None
    totals = {"deals": 0, "tokens": 0}
    start = time.perf_counter()
    try:
        with _progress() as progress:
            task = progress.add_task(f"{agent_a.spec} vs {agent_b.spec}", total=n, deals=0, tps=0.0)

            def advance(ep: Any) -> None:
                totals["deals"] += ep.agreed
                totals["tokens"] += sum(t.tokens or 0 for t in ep.turns)
                tps = totals["tokens"] / max(1e-9, time.perf_counter() - start)
                progress.update(task, advance=1, deals=totals["deals"], tps=tps)

            episodes = play_games(agent_a, agent_b, games, obj, max_messages, writer=writer, on_episode=advance)
    finally:
        if writer:
            writer.close()
    metrics = compute_metrics(episodes)
    if as_json:
        console.print_json(json.dumps(metrics))
    else:
        console.print(metrics_table(metrics, f"{agent_a.spec} vs {agent_b.spec}, {obj.name}, {n} games"))
    if output:
        err.print(f"episodes written to {output}")


ObjectiveOpt = Annotated[
    str, typer.Option("--objective", help="cooperative, semi-competitive, competitive, or λ in [-1, 1].")
]
GamesOpt = Annotated[int, typer.Option("-n", "--games", min=1, help="Number of games.")]
SeedOpt = Annotated[int, typer.Option(help="Seed for contexts, first speakers and sampling.")]
OutputOpt = Annotated[Path | None, typer.Option("-o", "--output", help="Write episodes to this JSONL file.")]
ContextsOpt = Annotated[
    Path | None, typer.Option(help="Lewis selfplay.txt-format context file (default: sample uniformly).")
]
CapOpt = Annotated[int, typer.Option(min=1, help="Messages before a game ends without a deal.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the metrics as one JSON object.")]
TempOpt = Annotated[float, typer.Option(min=0.0, help="Sampling temperature of model agents (0 = greedy).")]
TopPOpt = Annotated[float, typer.Option("--top-p", min=0.0, max=1.0, help="Nucleus sampling mass of model agents.")]
MaxTokOpt = Annotated[int, typer.Option("--max-new-tokens", min=1, help="Longest model reply, in tokens.")]


@app.command()
@user_errors
def play(
    a: Annotated[str, typer.Option("--a", help="Agent spec of player A, e.g. bot:hard or hf:smollm2-135m.")] = (
        "bot:hard"
    ),
    b: Annotated[str, typer.Option("--b", help="Agent spec of player B.")] = "bot:conceder",
    n: GamesOpt = 100,
    objective_spec: ObjectiveOpt = "semi-competitive",
    seed: SeedOpt = 0,
    output: OutputOpt = None,
    contexts: ContextsOpt = None,
    max_messages: CapOpt = DEFAULT_MAX_MESSAGES,
    human: Annotated[bool, typer.Option("--human", help="Play side A yourself, in this terminal.")] = False,
    temperature: TempOpt = 0.7,
    top_p: TopPOpt = 1.0,
    max_new_tokens: MaxTokOpt = 96,
    as_json: JsonOpt = False,
) -> None:
    """Play games between two agents and print their metrics."""
    obj = objective(objective_spec)
    sampling = Sampling(temperature, top_p, max_new_tokens, seed)
    agent_a = load_agent("human" if human else a, sampling)
    agent_b = agent_a if b == a and not human else load_agent(b, sampling)
    _play(agent_a, agent_b, n, obj, seed, output, contexts, max_messages, as_json)


@app.command()
@user_errors
def selfplay(
    model: Annotated[str, typer.Option("--model", help="Agent spec that plays both sides.")] = "hf:smollm2-135m",
    n: GamesOpt = 32,
    objective_spec: ObjectiveOpt = "semi-competitive",
    seed: SeedOpt = 0,
    output: OutputOpt = None,
    contexts: ContextsOpt = None,
    max_messages: CapOpt = DEFAULT_MAX_MESSAGES,
    temperature: TempOpt = 0.7,
    top_p: TopPOpt = 1.0,
    max_new_tokens: MaxTokOpt = 96,
    as_json: JsonOpt = False,
) -> None:
    """One agent plays both sides of every game (one model load, one batch per step)."""
    agent = load_agent(model, Sampling(temperature, top_p, max_new_tokens, seed))
    _play(agent, agent, n, objective(objective_spec), seed, output, contexts, max_messages, as_json)


def _read_all(files: list[Path]) -> list[Episode]:
    episodes = []
    for path in files:
        got = read_episodes(path)  # a torn last line is skipped and logged there
        if not got:
            raise EpisodeFileError(f"{path}: no episodes in this file")
        episodes += got
    return episodes


def _load_agents(specs: list[str], sampling: Sampling) -> list[Agent]:
    """Each agent of a tournament, with an error that names the one that cannot be loaded."""
    from parlay.loop import round_agent_spec

    agents: list[Agent] = []
    try:
        for spec in specs:
            name, resolved = round_agent_spec(spec)
            try:
                agent = load_agent(resolved, sampling)
            except AgentError as exc:
                raise AgentError(f"agent {spec!r}: {exc}") from None
            except Exception as exc:
                why = f"{type(exc).__name__}: {exc}"
                raise AgentError(f"agent {spec!r} ({resolved}) could not be loaded: {why}") from None
            agent.spec = name  # run:DIR@K, so that a resumed tournament plays the same models
            agents.append(agent)
    except (AgentError, ConfigError):
        for agent in agents:
            agent.close()
        raise
    return agents


def _interval(value: float, ci: list[float] | None, fmt: str) -> str:
    text = fmt.format(value)
    return text if not ci else f"{text} [{fmt.format(ci[0])}, {fmt.format(ci[1])}]"


def agents_table(result: dict[str, Any]) -> Table:
    """The tournament's agents by number; the other tables name them by it."""
    table = Table(title="agents", title_justify="left")
    table.add_column("#", justify="right")
    table.add_column("spec")
    for i, spec in enumerate(result["agents"]):
        table.add_row(str(i), spec)
    return table


def tournament_table(result: dict[str, Any]) -> Table:
    """One row per ordered pair (agents by number): the headline metrics with their intervals."""
    names = ["mean_reward_a", "mean_reward_b", "agreement_rate", "pareto_rate", "error_rate", "inconsistency_rate"]
    cols = [(name, LABELS[name][1], LABELS[name][2]) for name in names]
    table = Table(
        title=f"cross-play, {result['objective']['name']}, {result['games']} games per pair (95% CI)",
        title_justify="left",
    )
    table.add_column("A", justify="right")
    table.add_column("B", justify="right")
    for _, label, _ in cols:
        table.add_column(label, justify="right")
    for p in result["pairs"]:
        cells = (_interval(p["metrics"][k], p["ci95"].get(k), f) for k, _, f in cols)
        table.add_row(str(p["a_index"]), str(p["b_index"]), *cells)
    return table


def matrix_table(result: dict[str, Any]) -> Table:
    matrix = result["matrix"]
    table = Table(title="mean reward of the row agent against the column agent (both seats)", title_justify="left")
    table.add_column("", justify="right")
    for i in range(len(matrix["agents"])):
        table.add_column(str(i), justify="right")
    for i, row in enumerate(matrix["reward"]):
        table.add_row(str(i), *(f"{v:.2f}" for v in row))
    return table


def changes_table(result: dict[str, Any]) -> Table:
    """Each agent's paired change from agent 0 against every partner."""
    table = Table(
        title="own reward minus agent 0's against the same partner, same games (95% CI)", title_justify="left"
    )
    for col in ("agent", "partner", "change", "95% CI"):
        table.add_column(col, justify="right")
    number = {spec: str(i) for i, spec in enumerate(result["agents"])}
    for c in result["vs_first"]:
        low, high = c["ci95"]
        table.add_row(
            number[c["agent"]],
            number.get(c["partner"], c["partner"]),
            f"{c['mean']:+.2f}",
            f"[{low:+.2f}, {high:+.2f}]",
        )
    return table


@app.command("eval")
@user_errors
def eval_(
    files: Annotated[list[Path] | None, typer.Argument(help="Episodes JSONL file(s) to summarise.")] = None,
    agents: Annotated[
        str | None,
        typer.Option(
            "--agents",
            help="Comma-separated agent specs for a cross-play tournament; run:DIR[@K] is round K's model "
            "of a run (default: its last complete round).",
        ),
    ] = None,
    n: GamesOpt = 64,
    objective_spec: ObjectiveOpt = "semi-competitive",
    seed: SeedOpt = 0,
    max_messages: CapOpt = DEFAULT_MAX_MESSAGES,
    temperature: TempOpt = 0.7,
    top_p: TopPOpt = 1.0,
    max_new_tokens: MaxTokOpt = 96,
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
) -> None:
    """Metrics with 95% intervals of episode FILES, or a cross-play tournament of --agents."""
    from parlay.evaluate import summarize
    from parlay.evaluate.consistency import judge_summary

    if bool(files) == bool(agents):
        raise ConfigError("give either episodes FILES or --agents SPEC,SPEC,… (not both)")
    obj = objective(objective_spec)
    sampling = Sampling(temperature, top_p, max_new_tokens, seed)
    if files:
        episodes = _read_all(files)
        result = summarize(episodes, seed=seed)
        title = ", ".join(map(str, files))
    else:
        from parlay.evaluate.tournament import run_tournament

        specs = [s.strip() for s in (agents or "").split(",") if s.strip()]
        if not specs:
            raise ConfigError("--agents: no agent spec given")
        loaded = _load_agents(specs, sampling)
        out = out or Path("eval") / f"{obj.name}-n{n}-seed{seed}"
        hooks = _RichHooks()
        try:
            result = run_tournament(
                loaded, obj, n, seed, out, max_messages, sampling,
                on_pair=lambda what, total, done: (hooks.stage(what, total), hooks.advance(done)),
                on_episode=lambda ep: hooks.advance(deals=int(ep.agreed), tokens=sum(t.tokens or 0 for t in ep.turns)),
            )  # fmt: skip
        finally:
            hooks.end_stage()
            for agent in loaded:
                agent.close()
    if judge:
        if not files:  # the tournament's games, read back from its folder
            episodes = [ep for p in result["pairs"] for ep in read_episodes(out / p["episodes"])]
        judge_agent = load_agent(judge, Sampling(temperature=0.0, max_new_tokens=24, seed=seed))
        result["judge_consistency"] = judge_summary(judge_agent, episodes, seed=seed, limit=judge_limit)
    if track:
        _track_eval(track, out or Path("eval"), result)
    if as_json:
        console.print_json(json.dumps(result))
    elif files:
        console.print(metrics_table(result["metrics"], title, result["ci95"]))
    else:
        console.print(agents_table(result))
        console.print(tournament_table(result))
        console.print(matrix_table(result))
        console.print(changes_table(result))
        err.print(f"tournament written to {out}/tournament.json and tournament.csv")
    if judge and not as_json:
        j = result["judge_consistency"]
        rate = "n/a" if j["inconsistency_rate"] is None else f"{j['inconsistency_rate']:.1%}"
        agree = "n/a" if j["agreement_with_rules"] is None else f"{j['agreement_with_rules']:.1%}"
        console.print(
            f"judge {j['judge']}: {rate} of {j['messages']} messages misstate facts "
            f"({j['unreadable']} unreadable); agrees with the rules on {agree}"
        )


def _track_eval(track: str, log_dir: Path, result: dict[str, Any]) -> None:
    from parlay.tracking import Tracker, flatten

    tracker = Tracker([t.strip() for t in track.split(",") if t.strip()], log_dir, log_dir.name, None)
    try:
        figures: dict[str, float] = {}
        if "pairs" in result:
            for p in result["pairs"]:
                figures |= flatten(f"eval/{p['a']} vs {p['b']}", p["metrics"])
        else:
            figures = flatten("eval", result["metrics"])
        figures |= flatten("eval/judge", result.get("judge_consistency") or {})
        tracker.log(figures, 0)
    finally:
        tracker.close()


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


class _RichHooks:
    """The loop's hooks (``parlay.loop.Hooks``): a progress bar per stage, a table after each round."""

    def __init__(self) -> None:
        self.progress: Progress | None = None
        self.task: Any = None
        self.info = ""
        self.deals = 0
        self.tokens = 0
        self.started = time.perf_counter()

    def stage(self, description: str, total: int) -> None:
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
        self.deals, self.tokens, self.started = 0, 0, time.perf_counter()
        self.info = ""
        if not err.is_terminal:  # a log file gets one line per stage instead of a bar
            err.print(f"{description} ({total})", highlight=False)

    def advance(self, n: int = 1, **info: Any) -> None:
        if self.progress is None:
            return
        self.deals += info.get("deals", 0)
        self.tokens += info.get("tokens", 0)
        if "loss" in info:
            text = f"loss {info['loss']:.3f}"
        else:
            tps = self.tokens / max(1e-9, time.perf_counter() - self.started)
            text = f"deals {self.deals}  {tps:.0f} tok/s"
        self.info = text
        self.progress.update(self.task, advance=n, info=text)

    def end_stage(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            if not err.is_terminal:
                seconds = time.perf_counter() - self.started
                err.print(f"  done in {seconds:.0f} s; {self.info}", highlight=False)
            self.progress = None

    def round_done(self, row: dict[str, Any], history: list[dict[str, Any]]) -> None:
        console.print(rounds_table(history))

    def note(self, text: str) -> None:
        err.print(f"[yellow]{text}[/]", highlight=False)


def rounds_table(history: list[dict[str, Any]]) -> Table:
    """One row per round: reward (and its paired change from round 0), agreement, Pareto, errors,
    kept examples, train loss, minutes."""
    table = Table(title="rounds", title_justify="left")
    for col in ("round", "reward", "vs round 0 (95% CI)", "agree", "Pareto", "errors", "kept", "loss", "min"):
        table.add_column(col, justify="right")
    for row in history:
        train = row.get("train") or {}
        vs = row.get("vs_round0")
        table.add_row(
            str(row["round"]),
            f"{row['mean_reward']:.2f}",
            format_change(vs),
            f"{row['agreement_rate']:.0%}",
            f"{row['pareto_rate']:.0%}",
            f"{row['error_rate']:.0%}",
            str(train.get("kept", "")),
            f"{train['loss_last']:.3f}" if "loss_last" in train else ("skipped" if train.get("skipped") else ""),
            f"{row['minutes']:.1f}",
        )
    return table


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
) -> None:
    """Self-play rounds: play, keep the good games, fine-tune, play again."""
    from parlay.loop import Loop, prepare_run

    cfg = load_config(config, overrides)
    if init_data is not None:
        if not init_data.exists():
            raise FileNotFoundError(f"{init_data}: no such episodes file")
        cfg.warm_start.episodes, cfg.warm_start.bots = str(init_data), None
    cfg = prepare_run(cfg, resume)
    err.print(f"run directory: {cfg.run_dir}")
    started = time.perf_counter()
    hooks = _RichHooks()
    try:
        history = Loop(cfg, hooks).run()
    finally:
        hooks.end_stage()
    if history:
        last = history[-1]
        vs = last.get("vs_round0")
        if vs:
            console.print(
                f"round {last['round']} vs round 0 on the same {vs['games']} games: mean reward "
                f"{vs['mean']:+.2f}, 95% CI [{vs['ci95'][0]:+.2f}, {vs['ci95'][1]:+.2f}]"
            )
    err.print(f"done in {(time.perf_counter() - started) / 60:.1f} min; metrics in {cfg.run_dir / 'metrics.jsonl'}")
    if history:
        from parlay.evaluate.report import write_report

        path, _ = write_report(cfg.run_dir, seed=cfg.seed)
        err.print(f"report: {path}")


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
    stats: Annotated[Path | None, typer.Option("--stats", help="Write the training figures here.")] = None,
) -> None:
    """Fine-tune on a train.jsonl file; runs unchanged under `accelerate launch -m parlay sft …`."""
    from accelerate import PartialState

    from parlay.improve.sft import read_examples, save_stats, train

    cfg = load_config(config, overrides)
    result = train(
        read_examples(data), model, out, cfg.train, adapter=adapter, weights=cfg.weights,
        seed=cfg.seed, epochs=epochs, lr=lr,
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
    source: Annotated[Path, typer.Argument(help="An episodes JSONL file, or a run directory (every round).")],
    output: Annotated[Path, typer.Option("-o", "--output", help="File to write (a folder for --format hf).")],
    fmt: Annotated[
        str,
        typer.Option("--format", help="openai (chat fine-tuning JSONL), jsonl, or hf (a datasets folder)."),
    ] = "openai",
    keep: Annotated[
        str, typer.Option(help="Filter rule per round: all, above_mean, nonzero, top_fraction, threshold.")
    ] = "all",
) -> None:
    """Player-episodes as training data: OpenAI chat fine-tuning JSONL, plain JSONL with rewards, or a
    Hugging Face dataset (load it with datasets.load_from_disk)."""
    from parlay.config import FilterConfig
    from parlay.episode import player_episodes, write_lines_atomic
    from parlay.improve.filters import select
    from parlay.improve.openai_ft import export as export_openai
    from parlay.improve.sft import TrainExample

    if fmt not in ("openai", "jsonl", "hf"):
        raise ConfigError(f"--format {fmt!r}: expected openai, jsonl or hf")
    try:
        rule = FilterConfig(rule=keep)  # type: ignore[arg-type]
    except ValueError:
        raise ConfigError(f"--keep {keep!r}: expected all, above_mean, nonzero, top_fraction or threshold") from None
    if source.is_dir():
        files = sorted(source.glob("rounds/*/episodes.jsonl"), key=lambda p: int(p.parent.name))
        if not files:
            raise EpisodeFileError(f"{source}: no rounds/<k>/episodes.jsonl in this run directory")
    else:
        files = [source]
    kept = []
    for path in files:  # each file is one round: the filter compares within it
        pes = [pe for ep in read_episodes(path) for pe in player_episodes(ep)]
        kept += [pes[i] for i in select(pes, rule).kept]
    if fmt == "openai":
        n = export_openai([TrainExample(messages=pe.messages, reward=pe.reward) for pe in kept], output)
    else:
        fields = ("episode_id", "player", "reward", "raw_score", "agreed", "context_key", "messages", "meta")
        rows = [{f: getattr(pe, f) for f in fields} for pe in kept]
        if fmt == "hf":
            _save_hf_dataset(rows, output)
        else:
            write_lines_atomic(output, (json.dumps(row) for row in rows))
        n = len(kept)
    err.print(f"{n} player-episodes from {len(files)} file(s) written to {output}")


@app.command()
@user_errors
def report(
    run_dir: Annotated[Path, typer.Argument(help="A run directory (runs/<name>).")],
    seed: Annotated[int, typer.Option(help="Seed of the bootstrap intervals.")] = 0,
    judge: Annotated[
        str | None,
        typer.Option("--judge", help="Agent spec that also checks messages for misstated facts."),
    ] = None,
    judge_limit: Annotated[int, typer.Option(min=1, help="Most messages the judge checks per round.")] = 100,
) -> None:
    """Write RUN_DIR/report.html (self-contained) and RUN_DIR/plots/*.png."""
    from parlay.evaluate.report import write_report

    judge_agent = load_agent(judge, Sampling(temperature=0.0, max_new_tokens=24, seed=seed)) if judge else None
    path, view = write_report(run_dir, seed=seed, judge=judge_agent, judge_limit=judge_limit)
    for line in view.missing:
        err.print(f"[yellow]missing:[/] {line}", highlight=False)
    err.print(f"report written to {path} (plots in {run_dir / 'plots'})")


def _save_hf_dataset(rows: list[dict[str, Any]], output: Path) -> None:
    """Player-episodes as a ``datasets.Dataset`` saved to the folder ``output``. ``meta`` (free-form:
    agents, seeds, round) is kept as a JSON string, so every row has the same columns."""
    import shutil

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


def run() -> None:
    """Entry point; keeps a Ctrl-C quiet."""
    try:
        app()
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)
