"""The paper's own training route: OpenAI chat fine-tuning.

``export`` writes kept player-episodes as chat fine-tuning JSONL: one ``{"messages": [...]}``
line per example, system prompt and partner turns as context, every own assistant turn marked
``"weight": 1`` (the format allows only 0 or 1 per message). An example's weight therefore
becomes a number of copies: its integer part, plus one more with probability equal to the
fractional part (seeded), so the expected count is proportional to the weight.

``fine_tune`` uploads such a file, creates the job with the ``openai`` SDK, polls it until it
ends and returns the new model id, with which self-play continues (``openai:<id>@<url>``).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from parlay.episode import write_lines_atomic
from parlay.improve.sft import TrainExample

log = logging.getLogger(__name__)

FINAL = {"succeeded", "failed", "cancelled"}


class FineTuneError(RuntimeError):
    """A fine-tuning job that could not be created or did not succeed."""


def chat_record(example: TrainExample) -> dict:
    messages = []
    for m in example.messages:
        entry = {"role": m["role"], "content": m["content"]}
        if m["role"] == "assistant":
            entry["weight"] = 1
        messages.append(entry)
    return {"messages": messages}


def copies(weights: Sequence[float], seed: int = 0) -> list[int]:
    """How many times each example is written: floor(w), plus one with probability frac(w)."""
    rng = np.random.default_rng(seed)
    return [math.floor(w) + int(rng.random() < w - math.floor(w)) for w in weights]


def export(examples: Sequence[TrainExample], path: str | Path, seed: int = 0) -> int:
    """Write ``examples`` in the chat fine-tuning format; returns the number of lines written."""
    lines = [
        json.dumps(chat_record(ex))
        for ex, n in zip(examples, copies([ex.weight for ex in examples], seed), strict=True)
        for _ in range(n)
    ]
    write_lines_atomic(path, lines)
    return len(lines)


def fine_tune(
    path: str | Path,
    base_model: str,
    base_url: str | None = None,
    suffix: str | None = None,
    seed: int | None = None,
    poll_seconds: float = 30.0,
    on_status: Callable[[str], None] | None = None,
    client=None,
) -> str:
    """Upload ``path``, run a fine-tuning job on ``base_model`` and return the fine-tuned model id."""
    if client is None:
        from openai import OpenAI

        client = OpenAI(base_url=base_url)
    with open(path, "rb") as f:
        uploaded = client.files.create(file=f, purpose="fine-tune")
    kwargs = {"suffix": suffix} if suffix else {}
    if seed is not None:
        kwargs["seed"] = seed
    job = client.fine_tuning.jobs.create(model=base_model, training_file=uploaded.id, **kwargs)
    log.info("fine-tuning job %s created on %s with file %s", job.id, base_model, uploaded.id)
    status = None
    while True:
        if job.status != status:
            status = job.status
            if on_status:
                on_status(status)
        if job.status in FINAL:
            break
        time.sleep(poll_seconds)
        job = client.fine_tuning.jobs.retrieve(job.id)
    if job.status != "succeeded" or not job.fine_tuned_model:
        why = getattr(job.error, "message", None) if job.error else None
        raise FineTuneError(f"fine-tuning job {job.id} ended {job.status}" + (f": {why}" if why else ""))
    return job.fine_tuned_model
