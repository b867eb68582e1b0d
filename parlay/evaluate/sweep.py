"""A λ sweep: one pairing of agents played at several objectives on the same seeded games.

A model trained under one objective meets others. The sweep shows how it behaves across the
cooperative–competitive range: at each λ the same planned games (contexts, first speakers,
sampling seeds) are played, so the values of λ differ only in the objective the prompts state
and the scores count. Each λ's games go to ``OUT/lambda=<λ>.jsonl`` (resumable: finished games
are kept), and ``OUT/sweep.json`` holds every metric with its bootstrap interval per λ.
``play_sweep`` is ``parlay eval --agents A[,B] --lambdas …``: it loads the agents, holds the
folder's lock, plays and plots (``OUT/sweep.png``).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from parlay.agents import load_agents
from parlay.agents.base import Agent, Sampling
from parlay.episode import Episode, EpisodeWriter
from parlay.errors import ConfigError
from parlay.evaluate.metrics import summarize
from parlay.files import write_lines_atomic
from parlay.games.dond import objective
from parlay.locking import FolderLock
from parlay.rollout import plan_games, play_games, split_finished
from parlay.specs import AgentSpec

PANELS = [
    ("mean_reward_a", "A's reward"),
    ("mean_raw_score", "raw score (points kept)"),
    ("agreement_rate", "agreement rate"),
    ("pareto_rate_agreed", "Pareto-optimal (agreed)"),
]


def run_sweep(
    agent_a: Agent,
    agent_b: Agent,
    lambdas: Sequence[float],
    games: int,
    seed: int,
    out: Path,
    max_messages: int | None,
    on_episode: Callable[[Episode], None] | None = None,
    resamples: int = 2000,
) -> dict[str, Any]:
    """Play ``agent_a`` against ``agent_b`` at every λ on the same games; write and return the
    summary (what ``sweep.json`` holds)."""
    plan = plan_games(games, seed)
    points = []
    for lam in lambdas:
        obj = objective(float(lam))
        path = out / f"lambda={obj.lam:g}.jsonl"
        have, todo = split_finished(path, plan)
        if todo:
            with EpisodeWriter(path, append=True) as writer:
                meta = {"sweep": str(out), "lambda": obj.lam}
                played = play_games(agent_a, agent_b, todo, obj, max_messages, writer, on_episode, meta)
            have |= {ep.id: ep for ep in played}
        episodes = [have[g.id] for g in plan]
        points.append({"lambda": obj.lam, "episodes": path.name} | summarize(episodes, seed=seed, resamples=resamples))
    result = {"a": agent_a.spec, "b": agent_b.spec, "games": games, "seed": seed, "points": points}
    write_lines_atomic(out / "sweep.json", [json.dumps(result, indent=1)])
    return result


def play_sweep(
    specs: Sequence[AgentSpec],
    lambdas: Sequence[float],
    games: int,
    seed: int,
    out: Path,
    max_messages: int | None,
    sampling: Sampling,
    steal_lock: bool = False,
    on_start: Callable[[str, int], None] | None = None,
    on_episode: Callable[[Episode], None] | None = None,
) -> dict[str, Any]:
    """``run_sweep`` of one pairing — ``specs`` is [A] (itself) or [A, B] — holding ``out``'s
    lock, then ``sweep.png``. ``on_start(description, games)`` is called before play. Returns
    what ``sweep.json`` holds; ``ConfigError`` for more than two agents."""
    if len(specs) > 2:
        raise ConfigError("--lambdas sweeps one pairing: give --agents A (itself) or A,B")
    loaded = load_agents(list(dict.fromkeys(specs)), sampling)
    a, b = loaded[0], loaded[-1]
    try:
        with FolderLock(out, steal=steal_lock):
            if on_start is not None:
                on_start(f"{a.spec} vs {b.spec} at {len(lambdas)} values of λ", games * len(lambdas))
            result = run_sweep(a, b, lambdas, games, seed, out, max_messages, on_episode)
            save_plot(result, out / "sweep.png")
    finally:
        for agent in loaded:
            agent.close()
    return result


def read_sweep(path: Path) -> dict[str, Any]:
    """A ``sweep.json`` read back; ValueError naming the file when it is not one."""
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not a readable sweep file ({exc})") from None
    if not isinstance(data, dict) or not {"a", "b", "games", "points"} <= data.keys():
        raise ValueError(f"{path}: not a sweep file (a, b, games and points are expected)")
    return data


def plot_sweep(result: dict[str, Any]) -> plt.Figure:
    """Each panel: a metric against λ, with its 95 % interval."""
    fig, axes = plt.subplots(1, len(PANELS), figsize=(4 * len(PANELS), 3.6), constrained_layout=True)
    lams = np.array([p["lambda"] for p in result["points"]])
    for ax, (key, label) in zip(axes, PANELS, strict=True):
        values = np.array([p["metrics"][key] for p in result["points"]])
        ci = np.array([p["ci95"].get(key, [v, v]) for p, v in zip(result["points"], values, strict=True)])
        ax.errorbar(lams, values, yerr=np.abs(ci.T - values), marker="o", capsize=4)
        ax.set_title(label)
        ax.set_xlabel("λ (1 cooperative … −1 competitive)")
        ax.invert_xaxis()
        ax.grid(alpha=0.3)
    fig.suptitle(f"{result['a']} vs {result['b']}: {result['games']} games at each λ, 95% intervals")
    return fig


def save_plot(result: dict[str, Any], path: Path) -> None:
    fig = plot_sweep(result)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
