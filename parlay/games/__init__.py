"""The rules of Deal or No Deal. Pure: no language model, no I/O but reading context files."""

from parlay.games.contexts import ContextFileError, all_contexts, read_selfplay_file, sample_contexts
from parlay.games.dond import (
    DEFAULT_MAX_MESSAGES,
    ITEMS,
    MAX_REPLY_CHARS,
    OBJECTIVE_PRESETS,
    PLAYERS,
    Context,
    Objective,
    RuleError,
    objective,
    other,
)

__all__ = [
    "DEFAULT_MAX_MESSAGES",
    "ITEMS",
    "MAX_REPLY_CHARS",
    "OBJECTIVE_PRESETS",
    "PLAYERS",
    "Context",
    "ContextFileError",
    "Objective",
    "RuleError",
    "all_contexts",
    "objective",
    "other",
    "read_selfplay_file",
    "sample_contexts",
]
