"""Build a human proxy: behaviour cloning on games people played (``parlay proxy build``).

The human-proxy evaluation of Carroll et al. (2019, Overcooked-AI) clones people's play into a
model that stands in for them offline; Lewis et al. (2017) trained their RL negotiators against
a model supervised on the human dialogues. Here the people's games are an episodes file —
imported Lewis et al. dialogues (``parlay import-lewis``) or a study's export (``parlay study
export``) — and the proxy is the model fine-tuned on the people's sides of them, through the one
path from games to examples (``examples.select_examples``) and the one trainer (``sft.train``).

How it departs from a plain supervised model of the dialogues:

- **Which sides.** ``sides="auto"`` imitates the seats people held: both sides of a game that
  names no agents (a Lewis import: two people), seat ``human`` of a study export (the other seat
  is the model being studied, whose turns must not be learned). ``AB``, ``A`` or ``B`` force it.
- **A warm start first.** A small model does not know the protocol's deal form, and people's
  selections are two hidden proposals that must divide the items exactly. Before the people's
  games, the model imitates bot deals (``warm_start``, the run config's own machinery,
  ``improve/warm.py``) unless it starts from ``init``: a model that already knows the protocol
  (``run:DIR@K``, e.g. a run's warm-started round 0, or an adapter folder).

What it learned from is recorded in the folder (``parlay/proxy.py``: the file's SHA-256, games,
agreed games, sides, the objectives the people played under, the base model, the start, epochs,
parlay's version and commit). Everything about the input is checked before anything is trained
or played (``UserError`` naming the file and what to change).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from parlay import __version__
from parlay.config import FilterConfig, RunConfig, WarmStartConfig, WeightConfig, parse_config
from parlay.episode import Episode, EpisodeFileError, ReadReport, read_episodes, write_episodes
from parlay.errors import UserError
from parlay.games.dond import objective
from parlay.improve.examples import select_examples
from parlay.improve.warm import bot_demonstrations, warm_examples
from parlay.proxy import ProxyDir, ProxyManifest, file_sha256, source_commit
from parlay.run import ModelRef, RunDir
from parlay.specs import RunSpec, SpecError, parse_spec

log = logging.getLogger(__name__)

SIDES = ("auto", "AB", "A", "B")
KEEP = ("all", "agreed")
DEFAULT_WARM_START = WarmStartConfig(bots=["bot:conceder", "bot:conceder"], games=128, epochs=1.0, lr=1e-3)
"""The built-in warm start when the config gives none: the quickstart's (valid deals of 128 games
between two conceding bots, one epoch)."""


def default_config(overrides: list[str] | None = None) -> RunConfig:
    """The default recipe's settings when no run config is given: the embedded model, and the
    quickstart's training (LoRA r 16, lr 5e-4, two epochs, at least 8 steps) and warm start, with
    ``key=value`` ``overrides`` (``--set``) applied on top of them, not on the bare defaults."""
    data = {
        "model": "smollm2-135m",
        "train": {"lora_r": 16, "lora_alpha": 32, "lr": 5e-4, "epochs": 2, "min_steps": 8},
        "warm_start": DEFAULT_WARM_START.model_dump(mode="json", exclude_unset=True),
    }
    return parse_config(data, "the proxy's default recipe", overrides)


def read_human_games(path: str | Path) -> list[Episode]:
    """The games of an episodes file; ``UserError`` naming it when it cannot be read or is empty."""
    try:
        episodes = read_episodes(path, ReadReport())
    except EpisodeFileError as exc:
        raise UserError(str(exc)) from None
    if not episodes:
        raise UserError(
            f"{path}: no games; give an episodes file of people's games (parlay import-lewis, parlay study export)"
        )
    return episodes


def people_seats(episode: Episode, sides: str) -> str:
    """The seats of ``episode`` a proxy imitates: ``sides`` itself unless ``auto``, where it is the
    seats whose agent is ``human`` when the episode names its agents, and both when it does not."""
    if sides != "auto":
        return sides
    agents = episode.meta.get("agents")
    if not isinstance(agents, dict):
        return "AB"
    return "".join(seat for seat in "AB" if agents.get(seat) == "human")


def imitated(episodes: Sequence[Episode], sides: str) -> list[Episode]:
    """The episodes with ``meta["learner"]`` set to the seats imitated (the one path's rule for
    whose sides are learned, ``examples.learner_sides``)."""
    if sides not in SIDES:
        raise UserError(f"sides {sides!r}: expected one of {', '.join(SIDES)}")
    return [ep.model_copy(update={"meta": ep.meta | {"learner": people_seats(ep, sides)}}) for ep in episodes]


def human_examples(path: str | Path, episodes: Sequence[Episode], sides: str, keep: str):
    """The training examples of people's games (``examples.Selected``), after the checks every
    bad input fails before anything is trained: no agreed game, no turn of the imitated sides."""
    if keep not in KEEP:
        raise UserError(f"keep {keep!r}: expected one of {', '.join(KEEP)}")
    if not any(ep.agreed for ep in episodes):
        raise UserError(
            f"{path}: none of its {len(episodes)} games ended in a deal, so a proxy would never learn to "
            "make one; give games where people agreed (parlay eval FILE shows the agreement rate)"
        )
    marked = imitated(episodes, sides)
    selected = select_examples(marked, FilterConfig(rule=keep), WeightConfig())
    if not selected.examples:
        seats = sorted({ep.meta["learner"] or "none" for ep in marked})
        raise UserError(
            f"{path}: no turns of the side(s) the proxy imitates (sides {sides!r}: seats {', '.join(seats)}); "
            "give games where those seats spoke, or choose --sides A, B or AB"
        )
    return selected


def start_model(init: str | None, base: str | None) -> ModelRef:
    """The model behaviour cloning starts from: ``init`` (``run:DIR@K``: round K's model of a run;
    a folder holding an adapter (``adapter_config.json``) for ``base``, or full weights
    (``config.json``)), else ``base``. ``UserError``: no model named, an ``init`` that is neither,
    or a run whose base differs from ``base``."""
    if init is None:
        if base is None:
            raise UserError("name the proxy's base model (--model) or a model to start from (--init)")
        return ModelRef(base=base)
    if init.startswith("run:"):
        try:
            spec = parse_spec(init)
        except SpecError as exc:
            raise UserError(f"--init: {exc}") from None
        if not isinstance(spec, RunSpec) or spec.round == "all":
            raise UserError(f"--init {init}: name one round (run:DIR@K)")
        _, model = RunDir(spec.path).round_model(init, spec.round)
        if base is not None and model.base != base:
            raise UserError(f"--init {init} is a model of {model.base}, not of --model {base}; leave --model out")
        return model
    folder = Path(init).expanduser()
    if (folder / "adapter_config.json").is_file():
        if base is None:
            raise UserError(f"--init {init} is an adapter: name the base model it adapts (--model)")
        return ModelRef(base=base, adapter=str(folder))
    if (folder / "config.json").is_file():
        return ModelRef(base=str(folder))
    raise UserError(f"--init {init}: expected run:DIR@K, an adapter folder (adapter_config.json) or a model folder")


def build_proxy(
    episodes_path: str | Path,
    out: str | Path,
    cfg: RunConfig,
    *,
    base: str | None = None,
    init: str | None = None,
    sides: str = "auto",
    keep: str = "all",
    warm_start: WarmStartConfig | None = DEFAULT_WARM_START,
    epochs: float | None = None,
    lr: float | None = None,
    select: bool = True,
    on_stage: Callable[[str, int], None] | None = None,
    on_step: Callable[[int, int, float, int], None] | None = None,
) -> ProxyManifest:
    """Fine-tune a proxy of the people in ``episodes_path`` into ``out`` and write its manifest.

    ``cfg``: its ``train`` section (LoRA or full, lr, batch…) and ``seed``, and its
    ``rollout.max_messages`` for the warm start's bot games. ``base``: the base model (default: the
    run of ``init``'s, else ``cfg.model``). ``warm_start``: bot deals imitated first when there is
    no ``init`` (None: none). ``epochs``/``lr``: for the people's games (default ``cfg.train``'s).
    ``select``: the proxy plays with the selection step (``ProxyManifest.select``).
    ``on_stage(label, units)`` is told of each stage (games to play, then training); ``on_step``
    of each optimiser step. ``UserError`` (before anything is trained or played): an unreadable or
    empty file, no agreed game, no turn of the imitated sides, a bad ``init``, ``out`` already a proxy."""
    from parlay.improve.sft import train

    proxy = ProxyDir(out)
    if proxy.manifest_file.exists():
        raise UserError(f"{proxy.path} already holds a proxy ({proxy.manifest_file}); choose another --out")
    episodes = read_human_games(episodes_path)
    selected = human_examples(episodes_path, episodes, sides, keep)
    start = start_model(init, base if base is not None else (None if init and init.startswith("run:") else cfg.model))
    objectives = list({(ep.objective["name"], ep.objective["lam"]): ep.objective for ep in episodes}.values())
    warm = warm_start if (init is None and warm_start is not None and warm_start.enabled) else None
    proxy.path.mkdir(parents=True, exist_ok=True)

    if warm is not None:  # bot deals first: the protocol's deal form
        obj = objective(objectives[0]["lam"]) if len(objectives) == 1 else objective(0.0)
        if warm.episodes:
            demos = read_human_games(warm.episodes)
        else:
            demos = bot_demonstrations(warm, obj, cfg.seed, cfg.rollout.max_messages, on_stage)
            proxy.warm_start.mkdir(parents=True, exist_ok=True)
            write_episodes(proxy.warm_start / "episodes.jsonl", demos)
        ws_examples = warm_examples(demos, warm).examples
        if on_stage:
            on_stage(f"warm start: training on {len(ws_examples)} bot sides", 0)
        train(
            ws_examples, start.base, proxy.warm_start / "model", cfg.train, adapter=start.adapter,
            seed=cfg.seed, epochs=warm.epochs, lr=warm.lr, on_step=on_step, resume=True,
        )  # fmt: skip
        start = (
            ModelRef(base=start.base, adapter=str(proxy.warm_start / "model"))
            if cfg.train.lora
            else ModelRef(base=str(proxy.warm_start / "model"))
        )

    if on_stage:
        on_stage(f"behaviour cloning on {len(selected.examples)} people's sides", 0)
    stats = train(
        selected.examples, start.base, proxy.model, cfg.train, adapter=start.adapter,
        seed=cfg.seed, epochs=epochs, lr=lr, on_step=on_step, resume=True,
    )  # fmt: skip
    manifest = ProxyManifest(
        episodes=str(episodes_path),
        episodes_sha256=file_sha256(episodes_path),
        games=len(episodes),
        agreed_games=sum(ep.agreed for ep in episodes),
        sides=sides,
        keep=keep,
        examples=len(selected.examples),
        side_counts=_side_counts(selected.sides),
        objectives=objectives,
        base=start.base,
        init=init,
        start=start,
        warm_start=_warm_record(warm),
        lora=cfg.train.lora,
        epochs=epochs if epochs is not None else cfg.train.epochs,
        lr=lr if lr is not None else cfg.train.lr,
        seed=cfg.seed,
        select=select,
        parlay_version=__version__,
        parlay_commit=source_commit(),
        train_stats={
            "steps": stats.steps,
            "examples": stats.examples,
            "own_tokens": stats.own_tokens,
            "loss_first": stats.loss_first,
            "loss_last": stats.loss_last,
            "seconds": stats.seconds,
        },
    )
    proxy.write_manifest(manifest)
    return manifest


def _side_counts(sides: Sequence[Any]) -> dict[str, int]:
    return {seat: sum(s.player == seat for s in sides) for seat in "AB"}


def _warm_record(warm: WarmStartConfig | None) -> dict[str, Any] | None:
    if warm is None:
        return None
    return warm.model_dump(mode="json", exclude_none=True)
