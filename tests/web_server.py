"""A study server in its own process, for the tests that kill one mid-game.

    python -m tests.web_server --db URL --port P --agents bot:hard --delay 30

It serves what ``parlay serve --agent …`` serves, except that every model turn may be held for
``--delay`` seconds first, so a test can kill the server while a model turn is pending, and that
the store may fail: ``--fail-every K --fail-tries T`` makes every K-th move transaction fail its
first T tries (T of 3 or more: the move is refused with 503 and not acknowledged);
``--fail-writes add_move,create_game,mark`` names the transactions counted (default: moves).
"""

import argparse
import threading
import time

import uvicorn
from sqlalchemy.exc import OperationalError

from parlay.agents import Agent, load_agent
from parlay.agents.base import Reply, TurnRequest
from parlay.web.app import create_app
from parlay.web.store import WRITE_ATTEMPTS, Store
from parlay.web.study import study_from_flags


class Delayed(Agent):
    def __init__(self, agent: Agent, delay: float) -> None:
        self.agent, self.delay, self.spec = agent, delay, agent.spec

    def act(self, requests: list[TurnRequest]) -> list[Reply]:
        time.sleep(self.delay)
        return self.agent.act(requests)


class FailEvery:
    """A store fault: the first ``tries`` tries of every ``every``-th transaction named in
    ``names`` (moves by default) fail. A transaction's tries are told apart from others' by the
    thread that runs them (``Store.write`` retries in the thread it started in), so under
    concurrent writes the chosen transaction itself fails ``tries`` times, not its neighbours."""

    def __init__(self, every: int, tries: int, names: frozenset[str] = frozenset({"add_move"})) -> None:
        self.every, self.tries, self.names = every, tries, names
        self.counted = 0
        self.refused = 0
        """Transactions that failed every try (refused: with ``tries`` ≥ ``WRITE_ATTEMPTS``)."""
        self._failing: dict[int, int] = {}
        """Thread → tries failed so far of the transaction it is running."""
        self._lock = threading.Lock()

    def __call__(self, name: str) -> None:
        if name not in self.names:
            return
        thread = threading.get_ident()
        with self._lock:
            failed = self._failing.get(thread)
            if failed is None:
                self.counted += 1
                if self.counted % self.every:
                    return
                failed = 0
            if failed >= self.tries:  # this try passes
                del self._failing[thread]
                return
            if failed + 1 >= WRITE_ATTEMPTS:  # the last try: the store gives up, nothing follows
                self._failing.pop(thread, None)
                self.refused += 1
            else:
                self._failing[thread] = failed + 1
        raise OperationalError("INSERT", {}, Exception("disk I/O error (injected)"))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--db", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--agents", default="bot:hard")
    parser.add_argument("--objective", default="semi-competitive")
    parser.add_argument("--games", type=int, default=2)
    parser.add_argument("--delay", type=float, default=0.0)
    parser.add_argument("--admin-token", default="admin-token-for-tests")
    parser.add_argument("--abandon-minutes", type=float, default=30.0)
    parser.add_argument("--fail-every", type=int, default=0)
    parser.add_argument("--fail-tries", type=int, default=1)
    parser.add_argument("--fail-writes", default="add_move", help="Comma-separated transaction names.")
    args = parser.parse_args()
    specs = args.agents.split(",")
    study = study_from_flags(
        specs, args.objective, games_per_participant=args.games, abandon_after_minutes=args.abandon_minutes
    )
    agents: dict[str, Agent] = {s: Delayed(load_agent(s), args.delay) for s in specs}
    store = Store(args.db)
    store.check_writable(study.name)
    if args.fail_every:
        store.fault = FailEvery(args.fail_every, args.fail_tries, frozenset(args.fail_writes.split(",")))
    app = create_app(study, store, agents, args.admin_token, poll_seconds=2.0)
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
