"""What a study has gathered: per-participant totals and bonuses, per-condition results with the
same bootstrap intervals as ``parlay eval``, and the games exported as Episodes JSONL (the
self-play schema, so ``parlay eval``/``report`` read them and ``warm_start.episodes`` trains on
them) or as one CSV row per game.

The results use *finished* games only: games the referee ended (a deal, no deal, an abort or a
backend failure). A game whose person left (``abandoned``) is counted per condition, kept in the
CSV, and left out of the metrics, the points and the JSONL export; a game still being played is
counted as live."""

from __future__ import annotations

import csv
import io
from typing import Any

from parlay.episode import Episode
from parlay.evaluate.metrics import summarize
from parlay.web.hub import abandoned
from parlay.web.store import GameRow, ParticipantRow, Store
from parlay.web.study import HUMAN, Study

CONDITION_METRICS = (
    "games",
    "mean_reward_a",
    "mean_reward_b",
    "agreement_rate",
    "pareto_rate",
    "pareto_rate_agreed",
    "error_rate",
    "messages_per_game",
)
"""What the admin page shows per condition; seat A is the person, B the model."""


def finished(rows: list[GameRow]) -> list[GameRow]:
    """A participant's games that are over, recorded, and not abandoned (the games results use)."""
    return [g for g in rows if g.status == "done" and g.episode and not abandoned(g)]


def over(rows: list[GameRow]) -> list[GameRow]:
    """Games that are over, finished or abandoned."""
    return [g for g in rows if g.status == "done"]


def points(done: list[GameRow]) -> float:
    """The person's reward summed over their finished games (the person sits as A)."""
    return sum(g.episode["rewards"][0] for g in done)  # type: ignore[index]


def stage(p: ParticipantRow, games_over: int, study: Study) -> str:
    """consent, check, play, done (every game over) or ended (the admin ended their part)."""
    if p.ended_at is not None:
        return "ended"
    if p.consented_at is None:
        return "consent"
    if p.checked_at is None:
        return "check"
    return "done" if games_over >= study.games_per_participant else "play"


def bonus(p: ParticipantRow, games: list[GameRow], study: Study) -> float:
    """What the participant is paid: for their finished games' points, if the study pays them
    (``bonus_for``: finished — only when they reached the end; partial — also when they left)."""
    reached_end = stage(p, len(over(games)), study) == "done"
    if study.bonus_for == "finished" and not reached_end:
        return 0.0
    return study.bonus(points(finished(games)))


def episodes(store: Store, study: Study) -> list[Episode]:
    """The study's finished games, in participant and game order."""
    return [Episode.model_validate(row.episode) for row in finished(store.games(study.name, "done"))]


def study_results(store: Store, study: Study) -> dict[str, Any]:
    """Participants, games and per-condition results of a study (the admin page's data)."""
    rows = store.games(study.name)
    by_participant: dict[int, list[GameRow]] = {}
    for row in rows:
        by_participant.setdefault(row.participant_id, []).append(row)
    people = store.participants(study.name)
    participants = []
    for p in people:
        mine = by_participant.get(p.id, [])
        done = finished(mine)
        participants.append(
            {
                "number": p.number,
                "stage": stage(p, len(over(mine)), study),
                "conditions": [study.conditions[c].name for c in sorted(set(study.conditions_of(p.number)))],
                "games_done": len(done),
                "games_abandoned": sum(abandoned(g) for g in mine),
                "points": points(done),
                "bonus": bonus(p, mine, study),
                "check_attempts": p.check_attempts,
            }
        )
    played = [Episode.model_validate(r.episode) for r in finished(rows)]
    conditions = []
    for index, c in enumerate(study.conditions):
        eps = [e for e in played if e.meta.get("condition") == c.name]
        summary = summarize(eps) if eps else {"metrics": {"games": 0}, "ci95": {}}
        mine = [r for r in rows if r.condition == index]
        conditions.append(
            {
                "name": c.name,
                "agent": c.agent,
                "objective": c.objective,
                "started": len(mine),
                "finished": len(finished(mine)),
                "abandoned": sum(abandoned(r) for r in mine),
                "live": sum(r.status == "live" for r in mine),
                "metrics": {k: summary["metrics"].get(k) for k in CONDITION_METRICS},
                "ci95": {k: summary["ci95"][k] for k in CONDITION_METRICS if k in summary["ci95"]},
            }
        )
    numbers = {p.id: p.number for p in people}
    moves = store.move_counts(study.name)
    games = [game_row(r, study, numbers, moves.get(r.id, 0)) for r in rows]
    return {
        "study": study.name,
        "currency": study.currency,
        "bonus_for": study.bonus_for,
        "metrics_use": "finished games only (abandoned and live games are counted, not scored)",
        "participants": participants,
        "conditions": conditions,
        "games": games,
    }


def game_row(row: GameRow, study: Study, numbers: dict[int, int], moves: int) -> dict[str, Any]:
    """One game as a flat record (the admin table and the CSV export); ``moves``: its stored moves
    (its turns, live games included)."""
    ep = row.episode or {}
    outcome = ep.get("outcome", {})
    proposals = outcome.get("proposals", {})
    rewards, scores = ep.get("rewards", [None, None]), ep.get("raw_scores", [None, None])
    ctx = row.context
    return {
        "game": row.id,
        "participant": numbers[row.participant_id],
        "game_number": row.number + 1,
        "condition": study.conditions[row.condition].name,
        "agent": row.agent,
        "lambda": row.lam,
        "status": row.status,
        "outcome": "abandoned" if abandoned(row) else outcome.get("status", ""),
        "first_speaker": "human" if row.first_speaker == HUMAN else "model",
        "counts": " ".join(map(str, ctx["counts"])),
        "human_values": " ".join(map(str, ctx["values_a"])),
        "model_values": " ".join(map(str, ctx["values_b"])),
        "human_kept": " ".join(map(str, proposals.get("A", []))),
        "model_kept": " ".join(map(str, proposals.get("B", []))),
        "human_score": scores[0],
        "model_score": scores[1],
        "human_reward": rewards[0],
        "model_reward": rewards[1],
        "turns": moves,
        "updated": row.updated_at.isoformat(timespec="seconds") + "Z",
    }


def export_jsonl(store: Store, study: Study) -> str:
    return "".join(ep.model_dump_json() + "\n" for ep in episodes(store, study))


def export_csv(store: Store, study: Study) -> str:
    numbers = {p.id: p.number for p in store.participants(study.name)}
    moves = store.move_counts(study.name)
    rows = [game_row(r, study, numbers, moves.get(r.id, 0)) for r in store.games(study.name)]
    out = io.StringIO()
    if rows:
        writer = csv.DictWriter(out, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return out.getvalue()
