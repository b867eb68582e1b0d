"""Terminal tables (rich) of what ``evaluate`` computes: a set of games, a tournament, a run's rounds.

Labels and number formats come from ``metrics.LABELS``, the same the report uses.
"""

from __future__ import annotations

from typing import Any

from rich import box
from rich.table import Table

from parlay.evaluate.metrics import LABELS, format_change
from parlay.proxy import ProxyCheck
from parlay.run import RoundRecord
from parlay.specs import partner_kind, partner_label


def _table(title: str, **options: Any) -> Table:
    """Every table's style: a rule under the header, one space between columns and no frame, so
    that the widest (a run's partners, with two intervals) fits an 80-column log."""
    width = min(len(title), 80)  # a title wraps to its table's width: keep it on one line
    return Table(
        title=title, title_justify="left", box=box.SIMPLE_HEAD, padding=0, show_edge=False, min_width=width, **options
    )


def _interval(value: float, ci: list[float] | None, fmt: str) -> str:
    text = fmt.format(value)
    return text if not ci else f"{text} [{fmt.format(ci[0])}, {fmt.format(ci[1])}]"


def metrics_table(metrics: dict[str, Any], title: str, ci95: dict[str, list[float]] | None = None) -> Table:
    """Every metric of a set of games, with its interval when given."""
    table = _table(title, show_header=bool(ci95))
    table.add_column("metric")
    table.add_column("value", justify="right")
    if ci95:
        table.add_column("95% CI", justify="right")
    for key, (label, _, fmt) in LABELS.items():
        row = [label, fmt.format(metrics[key])]
        if ci95:
            low, high = ci95.get(key, (None, None))
            row.append("" if low is None else f"[{fmt.format(low)}, {fmt.format(high)}]")
        table.add_row(*row)
    return table


def agents_table(result: dict[str, Any]) -> Table:
    """The tournament's agents by number; the other tables name them by it."""
    table = _table("agents")
    table.add_column("#", justify="right")
    table.add_column("spec")
    for i, spec in enumerate(result["agents"]):
        table.add_row(str(i), spec)
    return table


def tournament_table(result: dict[str, Any]) -> Table:
    """One row per ordered pair (agents by number): the headline metrics with their intervals."""
    names = ["mean_reward_a", "mean_reward_b", "agreement_rate", "pareto_rate", "error_rate", "inconsistency_rate"]
    cols = [(name, LABELS[name][1], LABELS[name][2]) for name in names]
    table = _table(f"cross-play, {result['objective']['name']}, {result['games']} games per pair (95% CI)")
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
    table = _table("mean reward of the row agent against the column agent (both seats)")
    table.add_column("", justify="right")
    for i in range(len(matrix["agents"])):
        table.add_column(str(i), justify="right")
    for i, row in enumerate(matrix["reward"]):
        table.add_row(str(i), *(f"{v:.2f}" for v in row))
    return table


def changes_table(result: dict[str, Any]) -> Table:
    """Each agent's paired change from agent 0 against every partner."""
    table = _table("own reward minus agent 0's against the same partner, same games (95% CI)")
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


def tournament_tables(result: dict[str, Any]) -> list[Table]:
    tables = [agents_table(result), tournament_table(result), matrix_table(result), changes_table(result)]
    return tables + [t for t in (ratings_table(result),) if t is not None]


def partners_table(records: list[RoundRecord]) -> Table | None:
    """Per round, the trained model with each training partner and each held-out partner (*),
    each named with its kind where its spec does not say it (``specs.partner_label``):
    its own reward with the interval, the paired change from round 0 and agreement (the report
    adds the share of the ceiling and the distance to the Nash point: the terminal's table keeps
    to 80 columns whatever the intervals' widths). None for a self-play-only run."""
    rows = [
        (r.round, name, figures, held)
        for r in records
        for held, group in ((False, r.partners or {}), (True, r.heldout or {}))
        for name, figures in group.items()
    ]
    if not any(held or name != "self" for _, name, _, held in rows):
        return None
    table = _table("the model with each partner (* held out: never trained with)")
    for col in ("round", "partner", "games", "reward\n[95% CI]", "vs round 0\n[95% CI]", "agree"):
        table.add_column(col, justify="left" if col == "partner" else "right", no_wrap=True)
    for k, name, f, held in rows:
        table.add_row(
            str(k),
            partner_label(name) + (" *" if held else ""),
            str(f["games"]),
            _interval(f["mean_reward"], f.get("ci95"), "{:.2f}"),
            format_change(f.get("vs_round0")),
            f"{f['agreement_rate']:.0%}",
        )
    return table


def ratings_table(result: dict[str, Any]) -> Table | None:
    """The tournament's ratings (``ratings.py``), best first."""
    if not result.get("ratings"):
        return None
    table = _table("ratings (Bradley–Terry on paired games, Elo scale, 95% CI)")
    for col in ("agent", "rating", "95% CI"):
        table.add_column(col, justify="right")
    number = {spec: str(i) for i, spec in enumerate(result["agents"])}
    for r in result["ratings"]:
        low, high = r["ci95"]
        table.add_row(f"{number[r['agent']]} {r['agent']}", f"{r['rating']:+.0f}", f"[{low:+.0f}, {high:+.0f}]")
    return table


def sweep_table(result: dict[str, Any]) -> Table:
    """A λ sweep (``sweep.py``): per λ, A's reward, agreement, Pareto share of deals and points kept."""
    table = _table(f"{result['a']} vs {result['b']}, {result['games']} games at each λ (95% CI)")
    cols = ["mean_reward_a", "agreement_rate", "pareto_rate_agreed", "mean_raw_score"]
    table.add_column("λ", justify="right")
    for name in cols:
        table.add_column(LABELS[name][1], justify="right")
    for p in result["points"]:
        cells = (_interval(p["metrics"][k], p["ci95"].get(k), LABELS[k][2]) for k in cols)
        table.add_row(f"{p['lambda']:g}", *cells)
    return table


def rounds_table(records: list[RoundRecord]) -> Table:
    """One row per round: reward (and its paired change from round 0), agreement, Pareto, errors,
    kept examples, train loss, minutes."""
    table = _table("rounds")
    for col in ("round", "reward", "vs round 0\n[95% CI]", "agree", "Pareto", "errors", "kept", "loss", "min"):
        table.add_column(col, justify="right", no_wrap=True)
    for r in records:
        m, train = r.metrics, r.train
        kept = str(train.selection.kept) if train and train.selection else ""
        loss = "" if train is None else (f"{train.stats.loss_last:.3f}" if train.stats else "")
        if train is not None and not train.trained:
            loss = "skipped"
        table.add_row(
            str(r.round),
            f"{m['mean_reward']:.2f}",
            format_change(r.vs_round0),
            f"{m['agreement_rate']:.0%}",
            f"{m['pareto_rate']:.0%}",
            f"{m['error_rate']:.0%}",
            kept,
            loss,
            f"{r.minutes:.1f}",
        )
    return table


def proxy_check_table(check: ProxyCheck, name: str) -> Table:
    """A proxy's check (``evaluate/proxy.py``) in 80 columns: the proxy beside its base model
    (likelihood of the people's turns) and beside the people (their own games' figures)."""
    table = _table(
        f"{name} on {check.games} held human games (sides {check.sides}, {check.human_turns} turns, "
        f"{check.human_tokens} tokens)"
    )
    for col in ("", "proxy", "base model", "people"):
        table.add_column(col, justify="right" if col else "left")
    table.add_row("log-lik per token (nats)", f"{check.loglik_proxy:.3f}", f"{check.loglik_base:.3f}", "")
    table.add_row("log-lik per turn (nats)", f"{check.loglik_turn_proxy:.3f}", f"{check.loglik_turn_base:.3f}", "")
    table.add_row("agreement (with itself)", f"{check.proxy_agreement:.0%}", "", f"{check.human_agreement:.0%}")
    table.add_row("mean reward", f"{check.proxy_reward:.2f}", "", f"{check.human_reward:.2f}")
    table.add_row("replies accepted", f"{check.acceptance:.0%} ({check.accepted}/{check.attempts})", "", "")
    if check.select is not None:
        table.add_row("proposals", "selection step" if check.select else "sampled", "", "")
    if check.close_games:
        n = check.close_games
        table.add_row(
            f"deals closed from the people's talk (≤ {check.close_messages} more messages)",
            f"{check.close_agreement:.0%} of {n}", "", "100%",
        )  # fmt: skip
        table.add_row("  of which the people's split", f"{check.close_same_split:.0%} of {n}", "", "100%")
    return table


SEEDS_PER_TABLE = 5
"""Seed columns per table of ``seed_tables``, so that a table fits 80 columns."""


def _figure_name(label: str, width: int = 20) -> str:
    return label if len(label) <= width else "…" + label[-(width - 1) :]


def seed_tables(changes: list[dict[str, Any]], seeds: list[int]) -> list[Table]:
    """A run over seeds (``evaluate/seeds.py``): the change from round 0 across seeds per round
    and figure — mean, hierarchical bootstrap 95 % interval, IQM, probability of improvement —
    then each seed's own change, ``SEEDS_PER_TABLE`` seeds to a table. Each fits 80 columns."""
    across = _table("change from round 0 across seeds (95% CI: seeds, then games)")
    for col in ("round", "with", "mean [95% CI]", "IQM", "P(impr.)"):
        across.add_column(col, justify="right")
    for c in changes:
        low, high = c["ci95"]
        across.add_row(
            str(c["k"]),
            _figure_name(c["label"]),
            f"{c['mean']:+.2f} [{low:+.2f}, {high:+.2f}]",
            "–" if c["iqm"] is None else f"{c['iqm']:+.2f}",
            "–" if c["p_improvement"] is None else f"{c['p_improvement']:.2f}",
        )
    tables = [across]
    for start in range(0, len(seeds), SEEDS_PER_TABLE):
        chunk = seeds[start : start + SEEDS_PER_TABLE]
        per = _table("change from round 0 in each seed (* held out)")
        for col in ("round", "with", *(f"seed {s}" for s in chunk)):
            per.add_column(col, justify="right")
        for c in changes:
            cells = (f"{c['per_seed'][s]:+.2f}" if s in c["per_seed"] else "–" for s in chunk)
            per.add_row(str(c["k"]), _figure_name(c["label"]), *cells)
        tables.append(per)
    return tables


def _two_lines(value: float, ci: list[float] | None, fmt: str) -> str:
    """A figure over its interval, on two lines, so that long intervals keep a table in 80 columns."""
    return fmt.format(value) if not ci else f"{fmt.format(value)}\n[{fmt.format(ci[0])}, {fmt.format(ci[1])}]"


def partner_eval_tables(result: dict[str, Any]) -> list[Table]:
    """A fixed-partner evaluation (``evaluate/partners.py``): the agents and the partners by
    number (each partner with its kind), then per agent and partner its own reward, agreement and
    the paired change from agent 0 — across seeds for runs over seeds (IQM and P(improvement)
    with ≥ 3 seeds) — and each seed's change, ``SEEDS_PER_TABLE`` seeds to a table. 80 columns."""
    rows = result["rows"]
    seeds = {r["agent"]: r["seeds"] for r in rows}
    names = _table("agents (changes are from agent 0)")
    for col in ("#", "agent", "seeds"):
        names.add_column(col, justify="right" if col == "#" else "left", overflow="fold")
    for i, label in enumerate(result["agents"]):
        names.add_row(str(i), label, ",".join(map(str, seeds.get(label) or [])) or "–")
    partners = _table("partners")
    for col in ("#", "kind", "partner"):
        partners.add_column(col, justify="right" if col == "#" else "left", overflow="fold")
    number = {p: f"P{i}" for i, p in enumerate(result["partners"])}
    for p in result["partners"]:
        partners.add_row(number[p], partner_kind(p), p)
    over_seeds = any(r["seeds"] for r in rows)
    per = "per seed, " if over_seeds else ""
    main = _table(
        f"each agent with each partner, {result['objective']['name']}, {result['games']} games {per}"
        f"in both seats (95% CI{': seeds, then games' if over_seeds else ''})"
    )
    cols = ["agent", "partner", "own reward", "agree", "vs agent 0"] + (["IQM", "P(impr.)"] if over_seeds else [])
    for col in cols:
        main.add_column(col, justify="right", no_wrap=True)
    for r in rows:
        c = r["vs_first"]
        cells = [
            str(r["agent_index"]),
            f"{number[r['partner']]} {r['kind']}",
            _two_lines(r["mean_reward"], r["ci95"], "{:.2f}"),
            _two_lines(r["agreement_rate"], r["agreement_ci95"], "{:.0%}"),
            "–" if c is None else _two_lines(c["mean"], c["ci95"], "{:+.2f}"),
        ]
        if over_seeds:
            cells += ["–" if not c or c.get("iqm") is None else f"{c['iqm']:+.2f}"]
            cells += ["–" if not c or c.get("p_improvement") is None else f"{c['p_improvement']:.2f}"]
        main.add_row(*cells)
    tables = [names, partners, main]
    all_seeds = sorted({int(s) for r in rows for s in r["seeds"] or []})
    for start in range(0, len(all_seeds), SEEDS_PER_TABLE):
        chunk = all_seeds[start : start + SEEDS_PER_TABLE]
        table = _table("change from agent 0 in each seed (own reward, same games)")
        for col in ("agent", "partner", *(f"seed {s}" for s in chunk)):
            table.add_column(col, justify="right", no_wrap=True)
        for r in rows:
            if r["vs_first"] is None:
                continue
            by_seed = {int(s): v for s, v in r["vs_first"]["per_seed"].items()}
            cells = (f"{by_seed[s]:+.2f}" if s in by_seed else "–" for s in chunk)
            table.add_row(str(r["agent_index"]), f"{number[r['partner']]} {r['kind']}", *cells)
        tables.append(table)
    return tables
