"""Bootstrap intervals: weighted resamples (parlay) vs recomputing the metrics on each resample.

    .venv/bin/python bench/evaluate.py [--games 64 256 1024] [--resamples 2000]

``metric_intervals`` evaluates every metric as a function of per-game weights, so a resample is
a weight vector and all resamples of a metric are one matrix product (text metrics: one
bincount per resample). The naive way draws games with replacement and recomputes every metric
on the drawn list. Both give the same numbers (tests/test_evaluate.py checks it); this measures
the time. The naive way is timed on a few resamples and scaled up. Games are played by bots, so
the texts are the bots' (about 50 distinct words). Figures are appended to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import time
from pathlib import Path

import numpy as np

from parlay.agents import load_agent
from parlay.evaluate.metrics import GameTable, compute_metrics, metric_intervals
from parlay.games import objective
from parlay.rollout import plan_games, play_games

RESULTS = Path(__file__).with_name("RESULTS.md")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--games", type=int, nargs="+", default=[64, 256, 1024])
    parser.add_argument("--resamples", type=int, default=2000)
    parser.add_argument("--naive-resamples", type=int, default=20, help="Resamples actually timed for the naive way.")
    args = parser.parse_args()

    rows = []
    for n in args.games:
        episodes = play_games(
            load_agent("bot:random"), load_agent("bot:conceder"), plan_games(n, 0), objective("cooperative"), 10
        )
        t = time.perf_counter()
        table = GameTable(episodes)
        build = time.perf_counter() - t
        t = time.perf_counter()
        metric_intervals(table, resamples=args.resamples)
        weighted = time.perf_counter() - t
        rng = np.random.default_rng(0)
        t = time.perf_counter()
        for _ in range(args.naive_resamples):
            compute_metrics([episodes[i] for i in rng.integers(0, n, n)])
        naive = (time.perf_counter() - t) / args.naive_resamples * args.resamples
        rows.append((n, build, weighted, naive))
        print(f"{n} games: table {build:.2f} s, weighted {weighted:.2f} s, naive {naive:.1f} s (scaled)")

    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        f"\n## evaluate (bootstrap intervals) — {now}",
        f"Machine: {platform.machine()}, {len(os.sched_getaffinity(0))} threads; "
        f"{args.resamples} resamples of every metric; bot games (bot:random vs bot:conceder, cooperative).",
        "",
        "| games | build game table (s) | weighted resamples (s) | recompute per resample (s, scaled) | speed-up |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| {n} | {b:.2f} | {w:.2f} | {v:.1f} | {v / w:.0f}× |" for n, b, w, v in rows]
    with RESULTS.open("a", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    print(f"appended to {RESULTS}")


if __name__ == "__main__":
    main()
