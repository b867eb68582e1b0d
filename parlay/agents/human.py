"""A person at the terminal, playing through the same protocol as every other agent.

Plain text is sent as a message; ``propose 1 2 0`` (or ``[propose] (1 book, 2 hats, 0 balls)``)
makes a proposal. End of input (Ctrl-D) leaves the game, which is recorded as failed.
"""

from __future__ import annotations

import re

from rich.console import Console
from rich.panel import Panel

from parlay import prompts
from parlay.agents.base import Agent, Reply, TurnRequest
from parlay.protocol import message_reply, message_text, proposal_reply

_SHORT_PROPOSAL = re.compile(r"^/?propose\s+(\d+)\s+(\d+)\s+(\d+)\s*$", re.IGNORECASE)


def to_protocol(text: str) -> str:
    """What a person typed, as a protocol reply."""
    text = text.strip()
    m = _SHORT_PROPOSAL.match(text)
    if m:
        return proposal_reply(tuple(int(g) for g in m.groups()))  # type: ignore[arg-type]
    if text.startswith("[") or not text:
        return text
    return message_reply(text)


class HumanAgent(Agent):
    spec = "human"

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console()
        self._seen: dict[str, list[dict[str, str]]] = {}

    def act(self, requests: list[TurnRequest]) -> list[Reply]:
        return [self._turn(req) for req in requests]

    def _turn(self, req: TurnRequest) -> Reply:
        seen = self._seen.get(req.game_id)
        if seen is None:
            self.console.print(
                Panel(
                    f"Items: {prompts.inventory(req.context.counts)}\n"
                    f"Your values: {prompts.values_text(req.values)}\n"
                    f"{prompts.objective_text(req.objective)}\n\n"
                    "Type a message, or 'propose B H L' with the numbers of books, hats and balls you keep.",
                    title=f"Game {req.game_id}: you are player {req.player}",
                )
            )
            seen = req.messages[:1]  # the system prompt, shown above in short
        common = next(
            (i for i, (a, b) in enumerate(zip(seen, req.messages, strict=False)) if a != b),
            min(len(seen), len(req.messages)),
        )
        for msg in req.messages[common:]:
            if msg["role"] != "user":
                continue  # the person knows what they typed
            said = message_text(msg["content"])
            if said is not None:
                self.console.print(f"[bold magenta]Partner:[/] {said}")
            else:
                self.console.print(f"[yellow]{msg['content']}[/]")
        prompt = "Your proposal (propose B H L)" if req.proposal_owed else "You"
        try:
            text = self.console.input(f"[bold cyan]{prompt}>[/] ")
        except EOFError:
            return Reply("", error="the human player left the game")
        reply = to_protocol(text)
        self._seen[req.game_id] = [*req.messages, {"role": "assistant", "content": reply}]
        return Reply(reply)
