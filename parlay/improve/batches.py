"""The trainer's data preparation: examples → token rows → the plan of optimiser steps → tensors.

A ``Row`` is one example as token ids with its mask (1 on the player's own tokens,
``agents/hf_layer.assistant_mask``). A *target* is a position t whose next token t+1 is an own
token: only there does the model's output enter a loss, so only there are logits computed
(``losses.token_logps``).

``plan`` draws the optimiser steps before training: each step is a set of examples (batch ×
accumulation × processes of them), split into micro-batches of similar length (sorted within the
step), so a micro-batch carries little padding while the step — and so its gradient — is the one
the shuffle drew. It also counts the step's own tokens, which its loss is divided by.

``collate`` turns a micro-batch into tensors, with the length of the head its rows share (the
system prompt's opening words, identical in every game): the trainer computes it once for the
optimiser step (``losses.StepHead``), other passes once for the micro-batch, instead of once per
row.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from parlay.agents import hf_layer
from parlay.errors import ConfigError
from parlay.improve import TrainDataError
from parlay.improve.examples import TrainExample
from parlay.protocol import ChatMessage

MIN_SHARED = 16
"""A shared head shorter than this many tokens is not worth a forward call of its own."""


@dataclass
class Row:
    ids: list[int]
    mask: list[int]
    weight: float
    sampled: list[tuple[int, list[float]]] = field(default_factory=list)
    """Parity: (position of the first content token, the sampler's log-prob of each content token)
    of each assistant turn whose sampled tokens line up with the trainer's (``align_sampled``)."""
    unaligned: int = 0
    """Parity: assistant turns that carry the sampler's log-probs but do not line up."""
    ref_logp: float = 0.0
    """iw-SFT: mean own-token log-prob under the round-start model."""
    old_logps: list[float] | None = None
    """Online RL: log-prob of each own token (in order) under the round-start model."""

    @property
    def own(self) -> int:
        """Own target tokens: what the row adds to its step's loss denominator."""
        return sum(self.mask[1:])

    @property
    def own_positions(self) -> list[int]:
        """Positions of the own tokens, in order (each is predicted at the position before it)."""
        return [t for t in range(1, len(self.ids)) if self.mask[t]]


def check_room(tokenizer, opening: Sequence[ChatMessage], max_length: int, reply_tokens: int) -> None:
    """Refuse a ``train.max_length`` that cannot hold a game's opening (the system prompt and the
    kick-off, as the chat template renders them) and one reply of ``reply_tokens``: every example
    would be cut before its first own token, after minutes of play. ``ConfigError`` names the
    setting and the least value that fits."""
    need = len(hf_layer.render(tokenizer, opening, generation_prompt=True)) + reply_tokens
    if max_length < need:
        raise ConfigError(
            f"train.max_length={max_length} is shorter than a game's opening and one reply: the prompt is "
            f"{need - reply_tokens} tokens with this model's template, a reply up to {reply_tokens} "
            f"(rollout.max_new_tokens); set train.max_length to at least {need}"
        )


def tokenize(examples: Sequence[TrainExample], tokenizer, stops: set[int], max_length: int):
    """Rows to train on, and how many examples were cut to ``max_length`` or left with no own token."""
    rows, skipped, truncated = [], 0, 0
    for ex in examples:
        ids, mask = hf_layer.assistant_mask(tokenizer, ex.messages, stops)
        sampled, unaligned = align_sampled(mask, ex.sampled_logprobs, max_length)
        if len(ids) > max_length:
            truncated += 1
            ids, mask = ids[:max_length], mask[:max_length]
        if sum(mask[1:]) == 0:
            skipped += 1
            continue
        rows.append(Row(ids, mask, ex.weight, sampled, unaligned))
    if not rows:
        raise TrainDataError("no example has any of the player's own tokens to learn from")
    return rows, skipped, truncated


def turn_spans(mask: list[int]) -> list[tuple[int, int]]:
    """[start, end) of each run of own tokens: one per assistant turn (its content tokens and the
    end-of-turn token, ``hf_layer.assistant_mask``)."""
    spans, start = [], None
    for t, m in enumerate([*mask, 0]):
        if m and start is None:
            start = t
        elif not m and start is not None:
            spans.append((start, t))
            start = None
    return spans


def align_sampled(
    mask: list[int], sampled: list[list[float] | None] | None, max_length: int
) -> tuple[list[tuple[int, list[float]]], int]:
    """The assistant turns whose sampler log-probs (``TrainExample.sampled_logprobs``) can be set
    beside the trainer's: the turn's span must be exactly its sampled tokens plus the end-of-turn
    token (which the sampler leaves out), within ``max_length``. Returns ((start, log-probs) of each
    such turn, the number of turns with log-probs that are not: another tokenisation of the same
    text, a cut example, or a mask whose turns are not the example's)."""
    if not sampled:
        return [], 0
    carried = sum(lp is not None for lp in sampled)
    spans = turn_spans(mask)
    if len(spans) != len(sampled):
        return [], carried
    aligned = [
        (start, lp)
        for (start, end), lp in zip(spans, sampled, strict=True)
        if lp is not None and end - start == len(lp) + 1 and end <= max_length
    ]
    return aligned, carried - len(aligned)


# --------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class Step:
    """One optimiser step as this process runs it."""

    micro_batches: list[list[int]]
    """This process's micro-batches (row indices): ``grad_accum`` of them, more where
    ``train.micro_batch_tokens`` cuts them (as many in every process)."""
    own_tokens: int
    """Own tokens of every micro-batch of the step in every process: what its loss is divided by."""


def plan(
    rows: Sequence[Row],
    batch_size: int,
    grad_accum: int,
    micro_steps: int,
    nproc: int,
    rank: int,
    gen: torch.Generator,
    max_tokens: int | None = None,
) -> list[Step]:
    """The optimiser steps, at least ``micro_steps`` micro-batches in all and the same number of
    steps in every process (DDP needs every rank to step). The examples are shuffled epoch after
    epoch; a step takes the next ``batch_size × grad_accum × nproc`` of them, sorts them by length
    and cuts them into micro-batches (little padding), process r taking the r-th of every
    ``nproc``. So N processes with batch b and accumulation a take the examples one process takes
    with batch N·a·b and no accumulation (when the examples divide into whole batches). Every
    process draws the same plan, so each knows the step's own-token count before running it,
    without communicating (as transformers' Trainer counts ``num_items_in_batch``).

    ``max_tokens`` (``train.micro_batch_tokens``): a micro-batch whose rows × longest row exceeds
    it is cut into consecutive smaller ones of as even a size as fit (a row longer than it on its
    own), so the activations a micro-batch keeps are bounded; the step's examples, and so its loss
    and gradient, are unchanged. The processes' j-th micro-batches are all cut into as many pieces
    as the one that needs the most, so every process runs the same number of micro-batches
    (DeepSpeed and FSDP communicate at every one)."""
    per_step = batch_size * grad_accum * nproc
    n_steps = max(1, math.ceil(micro_steps / (grad_accum * nproc)))
    order: list[int] = []
    while len(order) < n_steps * per_step:  # whole epochs, as many as it takes
        order += torch.randperm(len(rows), generator=gen).tolist()
    steps = []
    for s in range(n_steps):
        chosen = sorted(order[s * per_step : (s + 1) * per_step], key=lambda i: (len(rows[i].ids), i))
        batches = [chosen[j : j + batch_size] for j in range(0, per_step, batch_size)]
        mine = []
        for j in range(grad_accum):  # the processes' j-th micro-batches: batches[j·nproc + r]
            pieces = max(_pieces(b, rows, max_tokens) for b in batches[j * nproc : (j + 1) * nproc])
            batch = batches[j * nproc + rank]
            mine += [batch[k * len(batch) // pieces : (k + 1) * len(batch) // pieces] for k in range(pieces)]
        steps.append(Step(mine, sum(rows[i].own for i in chosen)))
    return steps


def _pieces(batch: list[int], rows: Sequence[Row], max_tokens: int | None) -> int:
    """How many micro-batches ``batch`` (sorted by length) takes to hold at most ``max_tokens``
    padded positions each (cut evenly: each of ⌊·⌋ or ⌈·⌉ rows)."""
    longest = len(rows[batch[-1]].ids)
    if max_tokens is None or len(batch) * longest <= max_tokens:
        return 1
    return math.ceil(len(batch) / max(1, max_tokens // longest))


# --------------------------------------------------------------------------- tensors


@dataclass
class Batch:
    """A micro-batch as tensors. B rows, T positions (right-padded), N targets."""

    ids: torch.Tensor
    """[B, T] token ids."""
    attention: torch.Tensor
    """[B, T] 1 on real tokens, 0 on padding."""
    keep: torch.Tensor
    """[B, T] bool: True at the targets (positions whose next token is an own token)."""
    targets: torch.Tensor
    """[N] the own token each target predicts, row by row (the order of ``ids[keep]``)."""
    row: torch.Tensor
    """[N] which row each target belongs to."""
    shared: int
    """Length of the head every row shares and no target falls in (0: none worth sharing)."""


def collate(rows: Sequence[Row], pad_id: int, device, share: bool = True, head: int | None = None) -> Batch:
    """A micro-batch's tensors (``Batch``); with ``share``, the length of the head its rows have in
    common (``shared_head``), or ``head`` where the caller has it (its step's, ``shared_head`` of
    all the step's rows)."""
    width = max(len(r.ids) for r in rows)
    ids = torch.tensor([r.ids + [pad_id] * (width - len(r.ids)) for r in rows])
    attention = torch.tensor([[1] * len(r.ids) + [0] * (width - len(r.ids)) for r in rows])
    keep = torch.tensor([r.mask[1:] + [0] * (width - len(r.ids) + 1) for r in rows], dtype=torch.bool)
    targets = ids[:, 1:][keep[:, :-1]]
    row = torch.arange(len(rows))[:, None].expand(-1, width)[keep]
    shared = head if head is not None else shared_head(rows) if share and len(rows) > 1 else 0
    return Batch(ids.to(device), attention.to(device), keep.to(device), targets.to(device), row.to(device), shared)


def shared_head(rows: Sequence[Row]) -> int:
    """Length of the head ``rows`` have in common, up to the first target of any row and leaving
    each row at least one token of its own; 0 when shorter than ``MIN_SHARED``."""
    first = rows[0].ids
    limit = min(min(len(r.ids) - 1 for r in rows), min(r.mask.index(1) - 1 for r in rows))
    n = 0
    while n < limit and all(r.ids[n] == first[n] for r in rows):
        n += 1
    return n if n >= MIN_SHARED else 0
