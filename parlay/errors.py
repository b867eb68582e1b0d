"""The project's user error: a mistake the user can fix (a setting, a file, an argument, a spec).

``UserError`` is what the command line reports in one line, without a traceback; its message
names what was wrong and where (a file and key, an option, a spec). ``ConfigError`` is its
historical name, kept so that ``except ConfigError`` and ``from parlay.config import
ConfigError`` go on working. The bottom layer: it imports nothing of parlay.
"""

from __future__ import annotations


class UserError(ValueError):
    """A mistake of the user's (a bad setting, file, argument or agent spec); the message names it."""


ConfigError = UserError
"""The former name of ``UserError`` (it began as the error of a bad config)."""
