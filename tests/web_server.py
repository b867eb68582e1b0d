"""A study server in its own process, for the tests that kill one mid-game.

    python -m tests.web_server --db URL --port P --agents bot:hard --delay 30

It serves what ``parlay serve --agent …`` serves, except that every model turn may be held for
``--delay`` seconds first, so a test can kill the server while a model turn is pending.
"""

import argparse
import time

import uvicorn

from parlay.agents import Agent, load_agent
from parlay.agents.base import Reply, TurnRequest
from parlay.web.app import create_app
from parlay.web.store import Store
from parlay.web.study import study_from_flags


class Delayed(Agent):
    def __init__(self, agent: Agent, delay: float) -> None:
        self.agent, self.delay, self.spec = agent, delay, agent.spec

    def act(self, requests: list[TurnRequest]) -> list[Reply]:
        time.sleep(self.delay)
        return self.agent.act(requests)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--db", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--agents", default="bot:hard")
    parser.add_argument("--objective", default="semi-competitive")
    parser.add_argument("--games", type=int, default=2)
    parser.add_argument("--delay", type=float, default=0.0)
    parser.add_argument("--admin-token", default="admin-token-for-tests")
    args = parser.parse_args()
    specs = args.agents.split(",")
    study = study_from_flags(specs, args.objective, games_per_participant=args.games)
    agents: dict[str, Agent] = {s: Delayed(load_agent(s), args.delay) for s in specs}
    app = create_app(study, Store(args.db), agents, args.admin_token, poll_seconds=2.0)
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
