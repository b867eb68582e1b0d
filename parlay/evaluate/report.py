"""``parlay report RUN_DIR``: ``report.html`` (self-contained, images inlined) and ``plots/*.png``.

The report shows, per round, every metric with its bootstrap 95 % interval; curves of reward,
agreement, Pareto-optimality, errors, the share above the mean and inconsistent messages; the
reward distribution; dialogue length and vocabulary; the round-score correlation with and without
non-agreements; with partners or held-out partners, the model's reward with each of them per round
beside its self-play curve; a cross-play heat map and ratings when the run holds a tournament
(``RUN_DIR/eval``), and a λ sweep's curves when it holds one; and the best and worst dialogue of
each round; and per trained round, what training did and the sampler–trainer parity (the KL
between the log-probs of the model that played and the trainer's, with a note above
``run.SAMPLER_KL_TOLERANCE``, so a silent divergence shows the round it happens). A partial run
gets a report of what exists, headed by what is missing.
"""

from __future__ import annotations

import base64
import io
from importlib import resources
from pathlib import Path
from typing import Any

import jinja2
import matplotlib

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt
import numpy as np

from parlay import prompts
from parlay.agents.base import Agent
from parlay.episode import Episode, write_lines_atomic
from parlay.evaluate.analysis import RunView, load_run, round_score_correlation
from parlay.evaluate.consistency import judge_summary
from parlay.evaluate.metrics import LABELS, METRICS, format_change, game_rewards
from parlay.evaluate.seeds import SeedsView, load_seeds, metric_across_seeds
from parlay.evaluate.sweep import plot_sweep
from parlay.games.dond import ITEMS
from parlay.locking import REPORT_LOCK, REPORT_WAIT, FolderLock
from parlay.run import SAMPLER_KL_TOLERANCE, RunDir, RunDirError, TrainStats
from parlay.seeds import SeedRuns, seed_folder
from parlay.specs import partner_label

CURVES = [
    ("mean_reward", "mean reward"),
    ("agreement_rate", "agreement rate"),
    ("pareto_rate", "Pareto-optimal rate"),
    ("error_rate", "error rate"),
    ("above_mean_share", "share above the mean"),
    ("inconsistency_rate", "inconsistent messages"),
]

TABLE_METRICS = [
    "mean_reward", "agreement_rate", "pareto_rate", "pareto_rate_agreed", "welfare_ratio", "ceiling_share",
    "nash_distance_agreed", "competitiveness", "error_rate",
    "abort_rate", "messages_per_game", "tokens_per_game", "vocabulary_size", "ngram_entropy_2",
    "ngram_entropy_5", "above_mean_share", "inconsistency_rate",
]  # fmt: skip
TABLE = [(name, LABELS[name][1], LABELS[name][2]) for name in TABLE_METRICS]


def write_report(
    run_dir: Path, seed: int = 0, judge: Agent | None = None, judge_limit: int = 100, steal_lock: bool = False
) -> tuple[Path, RunView]:
    """Write ``report.html`` and ``plots/*.png`` into ``run_dir``; returns the report's path and
    the run as read (``missing`` says what the run lacks). With a ``judge``, it also checks up to
    ``judge_limit`` messages per round for misstated facts. A run over seeds (``parlay/seeds.py``)
    gets the page across its seeds instead (``_write_seeds_report``; its view a ``SeedsView``).
    A live run can be reported: the report reads it and takes only the report's own lock."""
    if not Path(run_dir).is_dir():
        raise RunDirError(f"{run_dir}: no such run directory")
    with FolderLock(run_dir, steal=steal_lock, name=REPORT_LOCK, wait=REPORT_WAIT):
        if SeedRuns.find(run_dir) is not None:
            return _write_seeds_report(Path(run_dir), seed)
        return _write_report(run_dir, seed, judge, judge_limit)


def _write_report(run_dir: Path, seed: int, judge: Agent | None, judge_limit: int) -> tuple[Path, RunView]:
    view = load_run(run_dir, seed=seed)
    judged = {r.k: judge_summary(judge, r.episodes, seed, judge_limit) for r in view.rounds} if judge else {}
    plots_dir = RunDir(view.dir).plots
    plots_dir.mkdir(exist_ok=True)
    plots = {
        "curves": plot_curves(view),
        "rewards": plot_reward_distribution(view),
        "dialogue": plot_dialogue(view),
    }
    partners = plot_partners(view)
    if partners is not None:
        plots["partners"] = partners
    if view.tournament is not None:
        plots["crossplay"] = plot_crossplay(view.tournament)
    if view.sweep is not None:
        plots["sweep"] = plot_sweep(view.sweep)
    images = {}
    for name, fig in plots.items():
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
        plt.close(fig)
        (plots_dir / f"{name}.png").write_bytes(buf.getvalue())
        images[name] = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
    page = render(view, images, round_score_correlation(view.rounds, seed=seed), judged)
    out = RunDir(view.dir).report_file
    write_lines_atomic(out, [page])
    return out, view


# ---------------------------------------------------------------------- plots


def _series(view: RunView, key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rounds, values and (2 × rounds) distances to the interval's ends, for error bars."""
    ks = np.array([r.k for r in view.rounds])
    values = np.array([r.summary["metrics"][key] for r in view.rounds], dtype=float)
    ci = np.array([r.summary["ci95"].get(key, [v, v]) for r, v in zip(view.rounds, values, strict=True)])
    return ks, values, np.abs(ci.T - values)


def plot_curves(view: RunView) -> plt.Figure:
    fig, axes = plt.subplots(2, 3, figsize=(12, 6.5), constrained_layout=True)
    for ax, (key, label) in zip(axes.flat, CURVES, strict=True):
        ks, values, err = _series(view, key)
        ax.errorbar(ks, values, yerr=err, marker="o", capsize=4)
        if key == "mean_reward":
            _, ceiling, _ = _series(view, "reward_ceiling")
            ax.plot(ks, ceiling, "--", color="grey", label="ceiling")
            ax.legend(loc="best", fontsize=8)
        ax.set_title(label)
        ax.set_xlabel("round")
        ax.set_xticks(ks)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{view.name}: per round, with bootstrap 95% intervals")
    return fig


def partner_rows(view: RunView) -> list[dict[str, Any]]:
    """Per complete round, the model's figures with each training partner and each held-out one."""
    rows = []
    for r in view.rounds:
        if r.record is None:
            continue
        for held, group in ((False, r.record.partners or {}), (True, r.record.heldout or {})):
            rows += [{"k": r.k, "partner": name, "heldout": held} | f for name, f in group.items()]
    return rows


def plot_partners(view: RunView) -> plt.Figure | None:
    """The model's own reward with each partner per round (held-out ones dashed), with intervals;
    None for a self-play-only run."""
    rows = partner_rows(view)
    if not any(row["heldout"] or row["partner"] != "self" for row in rows):
        return None
    fig, ax = plt.subplots(figsize=(9, 4.5), constrained_layout=True)
    for name in dict.fromkeys(row["partner"] for row in rows):
        mine = [row for row in rows if row["partner"] == name]
        ks = [row["k"] for row in mine]
        values = np.array([row["mean_reward"] for row in mine])
        ci = np.array([row.get("ci95") or [v, v] for row, v in zip(mine, values, strict=True)])
        held = mine[0]["heldout"]
        label = f"{_short(name)} (held out)" if held else _short(name)
        ax.errorbar(
            ks, values, yerr=np.abs(ci.T - values), marker="o", capsize=3, ls="--" if held else "-", label=label
        )
    ax.set_xlabel("round")
    ax.set_ylabel("the model's own mean reward")
    ax.set_xticks(sorted({row["k"] for row in rows}))
    ax.set_title("with each partner: trained with (solid) and held out (dashed), 95% intervals")
    ax.legend(fontsize=8, loc="best")
    ax.grid(alpha=0.3)
    return fig


def plot_reward_distribution(view: RunView) -> plt.Figure:
    fig, ax = plt.subplots(figsize=(8, 4), constrained_layout=True)
    data = [list(game_rewards(r.episodes).values()) for r in view.rounds]
    ks = [r.k for r in view.rounds]
    ax.violinplot(data, positions=ks, showmeans=True, showextrema=True)
    rng = np.random.default_rng(0)
    for k, rewards in zip(ks, data, strict=True):
        ax.scatter(k + rng.uniform(-0.12, 0.12, len(rewards)), rewards, s=6, alpha=0.4, color="black")
    ax.set_xticks(ks)
    ax.set_xlabel("round")
    ax.set_ylabel("game reward (mean of both players)")
    ax.set_title("reward distribution per round")
    ax.grid(alpha=0.3)
    return fig


def plot_dialogue(view: RunView) -> plt.Figure:
    fig, axes = plt.subplots(1, 4, figsize=(15, 3.6), constrained_layout=True)
    panels = [
        ("messages_per_game", "messages per game"),
        ("tokens_per_game", "tokens per game"),
        ("vocabulary_size", "vocabulary size"),
    ]
    for ax, (key, label) in zip(axes[:3], panels, strict=True):
        ks, values, err = _series(view, key)
        ax.errorbar(ks, values, yerr=err, marker="o", capsize=4)
        ax.set_title(label)
    ks = [r.k for r in view.rounds]
    for n in (2, 3, 4, 5):
        axes[3].plot(ks, [r.summary["metrics"][f"ngram_entropy_{n}"] for r in view.rounds], marker="o", label=f"n={n}")
    axes[3].set_title("word n-gram entropy (bits)")
    axes[3].legend(fontsize=8)
    for ax in axes:
        ax.set_xlabel("round")
        ax.set_xticks(ks)
        ax.grid(alpha=0.3)
    return fig


def plot_crossplay(tournament: dict[str, Any]) -> plt.Figure:
    matrix = tournament["matrix"]
    agents = matrix["agents"]
    size = 2.2 + 0.9 * len(agents)
    fig, axes = plt.subplots(1, 2, figsize=(2 * size + 1, size), constrained_layout=True)
    panels = (("reward", "row agent's mean reward", "{:.2f}"), ("agreement", "agreement rate", "{:.0%}"))
    for ax, (key, label, fmt) in zip(axes, panels, strict=True):
        data = np.array(matrix[key], dtype=float)
        im = ax.imshow(data, cmap="viridis")
        fig.colorbar(im, ax=ax, shrink=0.8)
        ax.set_xticks(range(len(agents)), [_short(a) for a in agents], rotation=35, ha="right", fontsize=8)
        ax.set_yticks(range(len(agents)), [_short(a) for a in agents], fontsize=8)
        ax.set_xlabel("against")
        ax.set_title(label)
        for i in range(len(agents)):
            for j in range(len(agents)):
                value = data[i, j]
                ax.text(j, i, fmt.format(value), ha="center", va="center", fontsize=8,
                        color="white" if value < data.mean() else "black")  # fmt: skip
    fig.suptitle(f"cross-play, {tournament['objective']['name']}, {tournament['games']} games per ordered pair")
    return fig


def _short(spec: str, width: int = 28) -> str:
    return spec if len(spec) <= width else "…" + spec[-(width - 1) :]


# ---------------------------------------------------------------------- page


def _fmt(value: float | None, fmt: str) -> str:
    return "–" if value is None else fmt.format(value)


def _ci(ci: list[float] | None) -> str:
    return "" if not ci else f"{ci[0]:.2f}–{ci[1]:.2f}"


def _partner_cells(row: dict[str, Any]) -> dict[str, Any]:
    """One row of the partners table, formatted, the partner named with its kind (``specs.partner_label``)."""
    return row | {
        "label": partner_label(row["partner"]),
        "reward": _fmt(row["mean_reward"], "{:.2f}"),
        "ci": _ci(row.get("ci95")),
        "vs": format_change(row.get("vs_round0")),
        "agree": f"{row['agreement_rate']:.0%}",
        "share": f"{row['ceiling_share']:.0%}",
        "nash": f"{row['nash_distance_agreed']:.2f}",
    }


RL_KL_NOTE = 0.05
"""Online RL: a step whose approximate KL to the model that played is above this (nats per own
token) moved far from the games it learns from (PPO implementations stop an update near 0.01–0.05)."""


def _last_and_max(values: list[float] | None, fmt: str) -> str:
    """A per-step series as its last value and its largest; "–" without one."""
    if not values:
        return "–"
    return f"{fmt.format(values[-1])} (max {fmt.format(max(values))})"


def training_rows(view: RunView) -> list[dict[str, Any]]:
    """Per round that trained with the hf trainer: its steps and losses, the gradient norm before
    clipping (last step, and the largest), online RL's vital signs per step (approximate KL, clip
    fraction, entropy), and the sampler–trainer parity (``TrainStats.sampler_kl``), with a note when
    the KL is above the tolerance or RL moved far from the model that played."""
    rows = []
    for r in view.rounds:
        stats: TrainStats | None = r.train.stats if r.train else None
        if stats is None:
            continue
        kl = stats.sampler_kl
        note = ""
        if kl is not None and kl > SAMPLER_KL_TOLERANCE:
            note = f"above {SAMPLER_KL_TOLERANCE:g}: what was played is not what was trained"
        elif kl is None and stats.sampler_turns_not_comparable:
            note = "no turn's sampled tokens line up with the trainer's"
        if stats.approx_kls and max(stats.approx_kls) > RL_KL_NOTE:
            note = (
                note + "; " if note else ""
            ) + f"RL's approximate KL above {RL_KL_NOTE:g}: far from the games' model"
        rows.append(
            {
                "k": r.k,
                "steps": stats.steps,
                "loss": f"{stats.loss_first:.3f} → {stats.loss_last:.3f}",
                "grad_norm": _last_and_max(stats.grad_norms, "{:.2f}"),
                "approx_kl": _last_and_max(stats.approx_kls, "{:.1e}"),
                "clip_fraction": _last_and_max(stats.clip_fractions, "{:.0%}"),
                "entropy": (f"{stats.entropies[0]:.2f} → {stats.entropies[-1]:.2f}" if stats.entropies else "–"),
                "kl": _fmt(kl, "{:.2e}"),
                "abs_diff": _fmt(stats.sampler_logp_abs_diff, "{:.2e}"),
                "tokens": stats.sampler_tokens,
                "not_comparable": stats.sampler_turns_not_comparable,
                "note": note,
            }
        )
    return rows


def dialogue_html(ep: Episode) -> dict[str, Any]:
    """What the page shows of one game: context, turns (rejected ones marked), outcome."""
    ctx = ep.game_context()

    def values(player: str) -> str:
        return ", ".join(f"{item} {v}" for item, v in zip(ITEMS, ctx.values(player), strict=True))

    turns = [
        {
            "player": t.player,
            "text": t.text,
            "accepted": t.accepted,
            "note": "" if t.accepted else f"rejected: {t.detail or t.error}",
        }
        for t in ep.turns
    ]
    return {
        "id": ep.id,
        "inventory": prompts.inventory(ctx.counts),
        "values_a": values("A"),
        "values_b": values("B"),
        "first": ep.first_speaker,
        "turns": turns,
        "outcome": ep.outcome.status.replace("_", " ") + (f" ({ep.outcome.reason})" if ep.outcome.reason else ""),
        "scores": ep.raw_scores,
        "rewards": [round(r, 2) for r in ep.rewards],
    }


def render(
    view: RunView, images: dict[str, str], correlation: dict[str, Any], judged: dict[int, dict[str, Any]]
) -> str:
    rows = []
    for r in view.rounds:
        m, ci = r.summary["metrics"], r.summary["ci95"]
        cells = []
        for key, _, fmt in TABLE:
            low, high = ci.get(key, (None, None))
            interval = f"{fmt.format(low)}–{fmt.format(high)}" if low is not None else ""
            cells.append({"value": fmt.format(m[key]), "ci": interval})
        vs = r.record.vs_round0 if r.record else None
        stats, selection = (r.train.stats, r.train.selection) if r.train else (None, None)
        rows.append(
            {
                "k": r.k,
                "complete": r.complete,
                "games": m["games"],
                "cells": cells,
                "vs": format_change(vs),
                "judge": _fmt((judged.get(r.k) or {}).get("inconsistency_rate"), "{:.0%}"),
                "kept": selection.kept if selection else "",
                "loss": _fmt(stats.loss_last, "{:.3f}") if stats else "",
            }
        )
    dialogues = []
    for r in view.rounds:
        picked = r.best_and_worst()
        if picked:
            dialogues.append({"k": r.k, "best": dialogue_html(picked[0]), "worst": dialogue_html(picked[1])})
    cfg = view.config or {}
    settings = _settings(cfg) | {
        "filter": (cfg.get("filter") or {}).get("rule"),
        "weights": (cfg.get("weights") or {}).get("scheme"),
    }
    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)
    template = env.from_string(resources.files("parlay.evaluate").joinpath("report.html.j2").read_text("utf-8"))
    return template.render(
        name=view.name,
        run_dir=str(view.dir),
        settings={k: v for k, v in settings.items() if v is not None},
        missing=view.missing,
        columns=[label for _, label, _ in TABLE],
        judge=next(iter(judged.values()))["judge"] if judged else None,
        rows=rows,
        correlation=correlation,
        images=images,
        partners=[_partner_cells(row) for row in partner_rows(view)] if "partners" in images else [],
        training=training_rows(view),
        kl_tolerance=f"{SAMPLER_KL_TOLERANCE:g}",
        tournament=view.tournament,
        sweep=view.sweep,
        dialogues=dialogues,
    )


# ---------------------------------------------------------------------- a run over seeds


def _save(fig: plt.Figure, plots_dir: Path, name: str) -> str:
    """Write ``plots/NAME.png`` and return it as a data URL for the page."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    (plots_dir / f"{name}.png").write_bytes(buf.getvalue())
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def plot_seed_curves(view: SeedsView, seed: int = 0) -> plt.Figure:
    """``CURVES`` over seeds: each seed's curve faint, the mean over the seeds that completed a
    round bold, and a band with its hierarchical bootstrap 95 % interval."""
    fig, axes = plt.subplots(2, 3, figsize=(12, 6.5), constrained_layout=True)
    ks = view.rounds
    for ax, (key, label) in zip(axes.flat, CURVES, strict=True):
        for s, by_round in view.tables.items():
            mine = sorted(by_round)
            values = [float(METRICS[key](by_round[k], np.ones((1, by_round[k].games)))[0]) for k in mine]
            first = s == next(iter(view.tables))
            ax.plot(mine, values, color="tab:blue", alpha=0.25, lw=1, marker=".", label="each seed" if first else None)
        means, lows, highs = [], [], []
        for k in ks:
            tables = [by_round[k] for by_round in view.tables.values() if k in by_round]
            value, (low, high) = metric_across_seeds(tables, key, seed + k)
            means.append(value)
            lows.append(low)
            highs.append(high)
        ax.fill_between(ks, lows, highs, color="tab:blue", alpha=0.15, label="95% interval")
        ax.plot(ks, means, color="tab:blue", lw=2.5, marker="o", label="mean over seeds")
        ax.set_title(label)
        ax.set_xlabel("round")
        ax.set_xticks(ks)
        ax.grid(alpha=0.3)
    axes.flat[0].legend(loc="best", fontsize=8)
    fig.suptitle(f"{view.name}: {len(view.seeds)} seeds; intervals over seeds and games")
    return fig


def plot_seed_changes(view: SeedsView) -> plt.Figure | None:
    """Per figure (all games, each partner, each held-out one), the change from round 0 per
    round: each seed faint, the mean bold, the hierarchical 95 % interval as a band; None before
    round 1 is complete anywhere."""
    figures = list(dict.fromkeys(c["figure"] for c in view.changes))
    if not figures:
        return None
    cols = min(3, len(figures))
    rows = -(-len(figures) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), constrained_layout=True, squeeze=False)
    for ax, key in zip(axes.flat, figures, strict=False):
        mine = [c for c in view.changes if c["figure"] == key]
        ks = [0] + [c["k"] for c in mine]
        for s in view.seeds:
            points = [(c["k"], c["per_seed"][s]) for c in mine if s in c["per_seed"]]
            if points:
                xs, ys = zip(*[(0, 0.0), *points], strict=True)
                ax.plot(xs, ys, color="tab:green", alpha=0.3, lw=1, marker=".")
        ax.fill_between(ks, [0.0] + [c["ci95"][0] for c in mine], [0.0] + [c["ci95"][1] for c in mine],
                        color="tab:green", alpha=0.15)  # fmt: skip
        ax.plot(ks, [0.0] + [c["mean"] for c in mine], color="tab:green", lw=2.5, marker="o")
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_title(_short(mine[0]["label"]), fontsize=10)
        ax.set_xlabel("round")
        ax.set_ylabel("own reward minus round 0's")
        ax.set_xticks(ks)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(figures) :]:
        ax.axis("off")
    fig.suptitle("change from round 0: seeds faint, mean bold, 95% interval over seeds and games (* held out)")
    return fig


def _change_cells(c: dict[str, Any], seeds: list[int]) -> dict[str, Any]:
    per = c["per_seed"]
    return c | {
        "cells": [f"{per[s]:+.2f}" if s in per else "–" for s in seeds],
        "mean": f"{c['mean']:+.2f}",
        "ci": f"{c['ci95'][0]:+.2f} – {c['ci95'][1]:+.2f}",
        "iqm": "–" if c["iqm"] is None else f"{c['iqm']:+.2f}",
        "p": "–" if c["p_improvement"] is None else f"{c['p_improvement']:.2f}",
    }


def _settings(cfg: dict[str, Any]) -> dict[str, Any]:
    """The settings every report's header shows, from a run's config as stored."""
    return {
        "model": cfg.get("model"),
        "objective": cfg.get("objective"),
        "rounds planned": cfg.get("rounds"),
        "games per round": (cfg.get("rollout") or {}).get("games"),
    }


def _write_seeds_report(run_dir: Path, seed: int) -> tuple[Path, SeedsView]:
    """``report.html`` and ``plots/`` of a run over seeds (see ``write_report``)."""
    view = load_seeds(run_dir, seed=seed)
    plots_dir = RunDir(view.dir).plots
    plots_dir.mkdir(exist_ok=True)
    images = {"curves": _save(plot_seed_curves(view, seed), plots_dir, "curves")}
    changes = plot_seed_changes(view)
    if changes is not None:
        images["changes"] = _save(changes, plots_dir, "changes")
    settings = _settings(view.config or {}) | {"seeds": ", ".join(map(str, view.seeds))}
    links = [
        {"name": seed_folder(s), "href": f"{seed_folder(s)}/report.html", "rounds": ", ".join(map(str, sorted(t)))}
        for s, t in view.tables.items()
    ]
    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)
    template = env.from_string(resources.files("parlay.evaluate").joinpath("report_seeds.html.j2").read_text("utf-8"))
    page = template.render(
        name=view.name,
        run_dir=str(view.dir),
        settings={k: v for k, v in settings.items() if v is not None},
        missing=view.missing,
        seeds=view.seeds,
        seed_links=links,
        changes=[_change_cells(c, view.seeds) for c in view.changes],
        images=images,
    )
    out = RunDir(view.dir).report_file
    write_lines_atomic(out, [page])
    return out, view
