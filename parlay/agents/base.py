"""The one agent interface: a batch of turn requests in, one reply each out.

Every backend — rule-based bots, transformers, OpenAI-compatible endpoints, vLLM, a person at
a terminal — implements ``Agent.act``. A ``TurnRequest`` carries the chat conversation a
language model reads plus the structured facts a bot or a user interface needs (the player's
own context, whether a proposal is owed). Bots read their partner only through the text.

Language-model backends (``ModelAgent``) also offer the plain completion call ``complete``:
conversations in, text out, with no game around them. Judges use it (``improve/judge.py``,
``evaluate/consistency.py``), all with ``JUDGE_SAMPLING``; a game turn is a completion of the
player's conversation.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

from parlay.config import RolloutConfig
from parlay.games.dond import Context, Objective
from parlay.protocol import ChatMessage

_ROLLOUT = RolloutConfig()


@dataclass(frozen=True)
class Sampling:
    """Sampling settings shared by every model backend; defaults are ``RolloutConfig``'s."""

    temperature: float = _ROLLOUT.temperature
    top_p: float = _ROLLOUT.top_p
    max_new_tokens: int = _ROLLOUT.max_new_tokens
    seed: int = 0


JUDGE_SAMPLING = Sampling(temperature=0.0, top_p=1.0, max_new_tokens=32)
"""How every judge samples: greedy, and long enough for a rating or a yes/no with a reason."""


@dataclass(frozen=True)
class Prompt:
    """One plain completion: a conversation to continue, with its own seed."""

    messages: list[ChatMessage]
    seed: int = 0
    key: tuple[str, str] | None = None
    """Names a conversation that goes on over several calls (game, player), so a backend may
    reuse what it computed for its earlier turns; None for a one-off prompt."""


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
    logprobs: list[float] | None = None
    """Per generated token (stop token excluded), its log-probability under the model's own
    distribution (temperature 1, no top-p), where the backend computes it (``protocol.Turn``)."""
    error: str | None = None
    """Set when the backend could not produce a reply at all; the game is then recorded as failed."""


class AgentError(RuntimeError):
    """An agent that cannot be created (unknown spec, missing package, unreadable model)."""


class TemplateError(ValueError):
    """A chat template that cannot serve training: it does not render a conversation's prefixes
    as prefixes of the whole (``hf_layer.assistant_mask``)."""


class Agent(ABC):
    """Plays one side of many games at once."""

    spec: str = "agent"

    @abstractmethod
    def act(self, requests: list[TurnRequest]) -> list[Reply]:
        """One reply per request, in order."""

    def complete(self, prompts: list[Prompt]) -> list[Reply]:
        """One reply per plain prompt, in order; only language-model backends can."""
        raise AgentError(f"{self.spec} cannot answer free-form prompts: a judge must be a language model")

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release resources (models, connections)."""


class ModelAgent(Agent):
    """A language model: a game turn is the completion of the player's conversation."""

    @abstractmethod
    def complete(self, prompts: list[Prompt]) -> list[Reply]:
        """One reply per prompt, in order."""

    def act(self, requests: list[TurnRequest]) -> list[Reply]:
        return self.complete([Prompt(r.messages, r.seed, (r.game_id, r.player)) for r in requests])
