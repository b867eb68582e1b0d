"""Evaluation: metrics with intervals, consistency checks, cross-play tournaments, run analyses,
reports and experiment tracking.

- ``metrics.py``: every metric, point estimates and bootstrap intervals;
- ``tables.py``: terminal tables of the above, a tournament's, and a run's rounds;
- ``consistency.py``: messages that misstate the speaker's counts or values (rules, judge);
- ``tournament.py``: every ordered pair of a set of agents on the same seeded games;
- ``analysis.py``: a run directory read back, per round, with the paper's analyses;
- ``report.py``: ``report.html`` and ``plots/*.png`` of a run;
- ``tracking.py``: TensorBoard and Weights & Biases logging.
"""

from parlay.evaluate.metrics import (
    METRICS,
    compute_metrics,
    game_rewards,
    metric_intervals,
    paired_difference,
    summarize,
)

__all__ = [
    "METRICS",
    "compute_metrics",
    "game_rewards",
    "metric_intervals",
    "paired_difference",
    "summarize",
]
