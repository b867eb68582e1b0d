"""Improvement operators: which player-episodes to learn from (``filters``), with what weight
(``weights``, ``judge``), the weighted assistant-only trainer (``sft``) and the OpenAI
fine-tuning route (``openai_ft``)."""


class TrainDataError(ValueError):
    """Training data that cannot be used; the message names the file and line."""


class TrainingDiverged(RuntimeError):
    """The loss became non-finite; nothing was saved (the caller keeps the model it started from)."""
