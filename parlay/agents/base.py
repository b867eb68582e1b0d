"""The one agent interface: a batch of turn requests in, one reply each out.

Every backend — rule-based bots, transformers, OpenAI-compatible endpoints, vLLM, a person at
a terminal — implements ``Agent.act``. A ``TurnRequest`` carries the chat conversation a
language model reads plus the structured facts a bot or a user interface needs (the player's
own context, whether a proposal is owed). Bots read their partner only through the text.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

from parlay.games.dond import Context, Objective
from parlay.protocol import ChatMessage


@dataclass(frozen=True)
class Sampling:
    """Sampling settings shared by every model backend."""

    temperature: float = 0.7
    top_p: float = 1.0
    max_new_tokens: int = 96
    seed: int = 0


@dataclass(frozen=True)
class TurnRequest:
    game_id: str
    player: str
    messages: list[ChatMessage]
    """What the player sees: system prompt, partner turns as user, own turns as assistant."""
    context: Context
    objective: Objective
    proposal_owed: bool
    n_messages: int
    max_messages: int | None
    seed: int
    """Per-request seed, derived from the game's seed, the turn and the attempt."""

    @property
    def values(self) -> tuple[int, int, int]:
        return self.context.values(self.player)


@dataclass(frozen=True)
class Reply:
    text: str
    tokens: int | None = None
    """Generated tokens, where the backend counts them."""
    error: str | None = None
    """Set when the backend could not produce a reply at all; the game is then recorded as failed."""


class AgentError(RuntimeError):
    """An agent that cannot be created (unknown spec, missing package, unreadable model)."""


class Agent(ABC):
    """Plays one side of many games at once."""

    spec: str = "agent"

    @abstractmethod
    def act(self, requests: list[TurnRequest]) -> list[Reply]:
        """One reply per request, in order."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release resources (models, connections)."""
