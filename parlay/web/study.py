"""A study: what people play, how they are assigned, what they are paid, what they must understand.

A study file (YAML) names the conditions to compare — each an agent spec and an objective — the
games each participant plays, the design (``between``: one condition per participant;
``within``: every participant meets every condition), the bonus per point and the completion
code of a crowd-work platform. ``parlay serve --agent A,B --objective X`` builds the same thing
from its flags. Unknown keys, unknown agents and impossible designs are refused before anything
is served.

Assignment is blinded and balanced: participant ``i`` (numbered by token creation) gets the
conditions of a seeded permuted block — in every block of k participants each of k conditions
appears once — and, in a ``within`` design, meets them in a rotated order (a Latin square), so
every condition is played equally often at every position. The contexts depend only on the
seed, the participant's number and the game's number. Nothing a participant sees names the
condition or the agent.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Literal

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from parlay import prompts
from parlay.config import ConfigError
from parlay.games.dond import DEFAULT_MAX_MESSAGES, TOTAL_VALUE, Context, Objective, RuleError, objective
from parlay.rollout import GameSpec, derive_seed, plan_games

HUMAN = "A"
"""The seat a person takes in every web game; the model sits as B. Who speaks first is drawn."""
MODEL = "B"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


LATER_SETTINGS = ("abandon_after_minutes", "bonus_for")
"""Study settings added after the first studies were stored (see ``Study.fingerprint``)."""


class Condition(_Strict):
    name: str = Field(..., min_length=1, max_length=64, description="Shown to the admin, never to participants.")
    agent: str = Field(..., min_length=1, description="Agent spec of the partner (bot:, hf:, run:DIR@K, openai:…).")
    objective: str = Field("semi-competitive", description="Preset name or λ in [-1, 1].")

    @field_validator("objective")
    @classmethod
    def _objective(cls, value: str) -> str:
        try:
            return objective(value).name
        except RuleError as exc:
            raise ValueError(str(exc)) from None

    @property
    def game_objective(self) -> Objective:
        return objective(self.objective)


class Study(_Strict):
    name: str = Field("study", min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$", description="Study id.")
    conditions: list[Condition] = Field(..., min_length=1, description="The agents and objectives compared.")
    design: Literal["between", "within"] = Field(
        "between", description="between: one condition per participant; within: each meets every condition."
    )
    games_per_participant: int = Field(3, ge=1, le=50, description="Games each participant plays.")
    max_messages: int = Field(DEFAULT_MAX_MESSAGES, ge=2, le=100, description="Messages before a game ends.")
    max_message_chars: int = Field(300, ge=20, le=1000, description="Longest chat message a person may send.")
    bonus_per_point: float = Field(0.0, ge=0.0, description="Bonus paid per point of reward a participant earns.")
    currency: str = Field("USD", max_length=8, description="Currency of the bonus.")
    completion_code: str | None = Field(
        None, max_length=64, description="Shown when all games are done (e.g. a Prolific completion code)."
    )
    seed: int = Field(0, description="Seeds the assignment, the contexts and the first speakers.")
    abandon_after_minutes: float | None = Field(
        30.0,
        gt=0,
        description="A live game whose person has not moved for this long (while it is their turn) ends as "
        "abandoned; null: never.",
    )
    bonus_for: Literal["finished", "partial"] = Field(
        "finished",
        description="Who is paid a bonus: finished, only participants who reached the end of the study; "
        "partial, also those who left, for the games they finished.",
    )
    consent: str = Field(
        "This is a research study of negotiation between people and computer programs. You will play a few "
        "short games by chat with a computer partner. We record your messages and moves, never your name; "
        "the records may be used to improve negotiating programs and may be published without anything that "
        "identifies you. Taking part is voluntary, and you may stop at any time by closing this page.",
        max_length=5000,
        description="The consent text shown before anything else.",
    )

    @model_validator(mode="after")
    def _check(self) -> Study:
        names = [c.name for c in self.conditions]
        if len(set(names)) != len(names):
            raise ValueError(f"conditions: names must be unique, got {names}")
        if self.design == "within":
            objectives = {c.objective for c in self.conditions}
            if len(objectives) > 1:
                raise ValueError(
                    "design: within needs one objective for all conditions (a participant is instructed "
                    f"once), got {sorted(objectives)}; use design: between to compare objectives"
                )
        return self

    # -- assignment

    def conditions_of(self, participant: int) -> list[int]:
        """The condition (index) of each game of participant ``participant`` (0-based)."""
        k = len(self.conditions)
        block, slot = divmod(participant, k)
        order = np.random.default_rng(derive_seed(self.seed, 7, block)).permutation(k)
        first = int(order[slot])
        if self.design == "between":
            return [first] * self.games_per_participant
        return [(first + j) % k for j in range(self.games_per_participant)]

    def game_plan(self, participant: int, game: int) -> GameSpec:
        """The seeded context and first speaker of a participant's game."""
        seed = derive_seed(self.seed, 11, participant)
        return plan_games(game + 1, seed)[game]

    def objective_for(self, participant: int) -> Objective:
        """The objective a participant is instructed in (that of their first game)."""
        return self.conditions[self.conditions_of(participant)[0]].game_objective

    def bonus(self, points: float) -> float:
        """What a participant earns for ``points`` of reward (never negative), rounded to cents."""
        return round(max(0.0, points) * self.bonus_per_point, 2)

    def fingerprint(self) -> str:
        """Identifies the study's content: tokens made for one study are refused by another. Settings
        added after studies were first stored count only when they differ from their default, so a
        study stored before them keeps its fingerprint."""
        later = {k for k in LATER_SETTINGS if getattr(self, k) == type(self).model_fields[k].default}
        return hashlib.sha256(self.model_dump_json(exclude=later).encode()).hexdigest()[:16]


def load_study(path: str | Path) -> Study:
    """A study from YAML; a clear ConfigError names the file and key otherwise."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such study file") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a study file must be a mapping of keys to values")
    return _validated(data, str(path))


def study_from_flags(agents: list[str], objective_name: str, **extra: Any) -> Study:
    """The study ``parlay serve --agent A,B --objective X`` runs without a study file."""
    conditions = [{"name": spec, "agent": spec, "objective": objective_name} for spec in agents]
    return _validated({"conditions": conditions, **extra}, "--agent/--objective")


def _validated(data: dict, where: str) -> Study:
    try:
        return Study.model_validate(data)
    except ValidationError as exc:
        problems = []
        for e in exc.errors():
            key = ".".join(str(p) for p in e["loc"]) or "(study)"
            msg = "unknown key" if e["type"] == "extra_forbidden" else e["msg"].removeprefix("Value error, ")
            problems.append(f"{key}: {msg}")
        raise ConfigError(f"{where}: " + "; ".join(problems)) from None


# ------------------------------------------------------------------ comprehension check


def comprehension_questions(obj: Objective) -> list[dict[str, Any]]:
    """A short check of the rules and of the objective in force. Each question has options and
    the index of the right one; the app sends the questions without their answers."""
    if obj.lam == 0:
        right = 0
    elif obj.lam == 1:
        right = 1
    elif obj.lam == -1:
        right = 2
    else:
        right = 3
    weighted = f"My points {'plus' if obj.lam >= 0 else 'minus'} {abs(obj.lam):g} × my partner's points"
    return [
        {
            "id": "mismatch",
            "text": "Both of you propose, but the two proposals do not add up to the items on the table. "
            "What do the two of you score?",
            "options": ["Each keeps what they proposed", "Nothing: both score 0", "The items are split evenly"],
            "answer": 1,
        },
        {
            "id": "objective",
            "text": "In this study, what does your score count?",
            "options": [
                "Only my own points",
                "My points plus my partner's points",
                "My points minus my partner's points",
                weighted if right == 3 else "My points times two",
            ],
            "answer": right,
        },
        {
            "id": "values",
            "text": f"Your items are worth {TOTAL_VALUE} points to you in total. What do you know of your "
            "partner's values?",
            "options": ["They are the same as mine", "Nothing, unless my partner tells me", "They are shown to me"],
            "answer": 1,
        },
    ]


def instructions(obj: Objective, max_messages: int) -> list[str]:
    """How to play, in plain words for people (the model reads the same rules in its prompt)."""
    return [
        "You and a partner divide a set of books, hats and balls. Each item goes to one of you.",
        f"You see what each item is worth to you; all items together are worth {TOTAL_VALUE} points to you. "
        "Your partner's values are different and hidden from you, as yours are from your partner.",
        "Chat to agree on a division. When you are ready, make a proposal: the number of each item YOU keep. "
        "Proposals are secret; once one of you proposes, the other must propose too, and the game ends.",
        "If the two proposals divide the items exactly, each of you scores the value of what they keep; "
        "otherwise both of you score nothing.",
        f"After {max_messages} messages in all, the game ends with no deal and both score nothing.",
        prompts.objective_text(obj),
    ]


def grade(obj: Objective, answers: dict[str, int]) -> list[str]:
    """The ids of the questions answered wrongly (or not at all); empty when all are right."""
    return [q["id"] for q in comprehension_questions(obj) if answers.get(q["id"]) != q["answer"]]


def public_context(context: Context, player: str) -> dict[str, list[int]]:
    """What a player may see of a context: the counts and their own values, never the partner's."""
    return {"counts": list(context.counts), "values": list(context.values(player))}
