"""Agents: everything that can take a turn. Named by spec strings such as ``bot:hard``."""

from __future__ import annotations

from parlay.agents.base import Agent, AgentError, Reply, Sampling, TurnRequest
from parlay.agents.scripted import BOTS


def load_agent(spec: str, sampling: Sampling | None = None) -> Agent:
    """The agent a spec string names.

    ``bot:NAME`` — a rule-based bot (``hard``, ``conceder``, ``cooperative``, ``random``);
    ``human`` — a person at this terminal.
    """
    kind, _, rest = spec.partition(":")
    if kind == "bot" and rest in BOTS:
        agent = BOTS[rest]()
        agent.spec = spec
        return agent
    if kind == "human" and not rest:
        from parlay.agents.human import HumanAgent

        return HumanAgent()
    known = ", ".join(f"bot:{n}" for n in BOTS)
    raise AgentError(f"unknown agent {spec!r}: expected one of {known}, human")


__all__ = ["Agent", "AgentError", "Reply", "Sampling", "TurnRequest", "load_agent"]
