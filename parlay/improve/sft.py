"""The weighted, assistant-only SFT trainer (filtered behaviour cloning and its weighted kin).

The loss (``weighted_nll``) is the negative log-likelihood of the player's own accepted turns,
token by token, each example scaled by its weight: uniform for the paper's filtered BC, AWR or
judge weights computed before training, or iw-SFT's importance factor, recomputed at every step
from the same forward pass against the frozen round-start model. Online RL (``weights.scheme:
rl``) replaces it with ``policy_gradient_loss``: each example's weight is its advantage, negative
ones included, and the loss is PPO's clipped surrogate on the per-token ratio to the round-start
model, plus a KL anchor to that model. How that departs from the usual recipes:

- REINFORCE with a baseline: the same gradient at the first step (ratio 1); the clip and the
  anchor keep several epochs over one round's games from running away, which plain REINFORCE
  cannot (it assumes fresh samples at every step).
- GRPO: the same group baseline (games on the same context) and std scaling, but leave-one-out
  (a side is not its own baseline) and per role: the first and the second speaker of a
  negotiation face different positions, so each is compared with its own role only — SPIRAL's
  role-conditioned idea, which parlay applies to general-sum games rather than zero-sum ones.
- SPIRAL's RAE keeps a running mean per role across training; here the baseline is computed
  from the round's own games, so a round's update depends on nothing but its games (and a
  resumed round reproduces it).

The loss of an optimiser step is the weighted sum over the own tokens of all its micro-batches, in
all processes, divided by the step's own-token count, which the plan counts before the step runs
(``_plan``, as transformers' Trainer counts ``num_items_in_batch``): batch b × accumulation a × p
processes has the loss and the gradient of one batch of a·b·p, whatever the examples' lengths
(``tests/test_sft.py`` checks every scheme against the loss computed by hand). Each micro-batch
back-propagates its share, times what accelerate's accumulation and DDP's average divide it by.

Before the first step, when the examples carry the sampler's log-probs of their turns
(``TrainExample.sampled_logprobs``, as the agent that played reported them), the trainer sets its
own beside them (``sampler_parity``, from the same pass that gives iw-SFT's π_ref and RL's π_old):
the same weights should give the same numbers, and a gap says that what was played is not what is
trained (template, tokenisation, temperature, adapter, dtype); it is recorded in ``TrainStats`` and
shown per round in the report.

A loss that is not finite stops training with ``TrainingDiverged`` before anything is saved.
The partner's turns, the system prompt and the chat template's role headers are context only
(mask 0; ``agents/hf_layer.assistant_mask``).

``train`` reads top to bottom: tokenise the examples, load the model, score them with the
round-start model where needed, plan the steps, run them, save atomically. With
``train.checkpoint_steps: N`` it also saves, every N optimiser steps, everything needed to go on
(``OUT.checkpoint.pt``: the trainable weights, the optimiser and scheduler, the RNG, the position in
the plan and the figures so far), written to a temporary file and renamed; with ``resume`` a new
call on the same data, model and settings continues from it and ends with the same weights as a run
never interrupted. The checkpoint is removed once the output is saved. It runs on accelerate, so
``accelerate launch -m parlay sft …`` runs this same code on several GPUs (DDP, or DeepSpeed/FSDP
through an accelerate config); in a single process it runs on CPU or one GPU. LoRA (peft) by
default, every weight with ``lora: false``. All randomness (LoRA's initialisation, the order of
examples) comes from ``seed``; the caller's
global random state is left as it was.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from parlay.agents import hf_layer
from parlay.agents.hf_layer import default_device, pick_dtype
from parlay.config import TrainConfig, WeightConfig
from parlay.episode import write_lines_atomic
from parlay.improve import TrainDataError, TrainingDiverged
from parlay.improve.examples import TrainExample
from parlay.improve.weights import iw_factor
from parlay.run import SAMPLER_KL_TOLERANCE, TrainStats

log = logging.getLogger(__name__)

Reweight = Callable[[torch.Tensor], torch.Tensor]
"""Per-sequence mean log-prob [B] → a factor [B] that multiplies the examples' weights."""


def weighted_nll(
    logits: torch.Tensor,
    input_ids: torch.Tensor,
    mask: torch.Tensor,
    weights: torch.Tensor,
    reweight: Reweight | None = None,
    own_tokens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Weighted token-level NLL of the player's own tokens.

    logits [B, T, V]; input_ids, mask [B, T] (mask 1 on own assistant tokens); weights [B];
    ``own_tokens``: what the summed loss is divided by (default: this batch's own tokens; in
    training, the own tokens of the whole optimiser step, all its micro-batches in all processes,
    so that the micro-batches' losses add up to the step's).
    Returns (loss: scalar, seq_logp: [B] each sequence's mean own-token log-prob, factor: [B]
    ``reweight(seq_logp)`` that multiplied the weights, ones without ``reweight``)."""
    targets = input_ids[:, 1:]  # [B, T-1]: token t+1 is predicted at t
    m = mask[:, 1:].float()  # [B, T-1]
    nll = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(), reduction="none")
    nll = nll.view_as(m)  # [B, T-1]
    seq_logp = -(nll * m).sum(1) / m.sum(1).clamp(min=1)  # [B]
    factor = reweight(seq_logp) if reweight is not None else torch.ones_like(seq_logp)  # iw-SFT's, else 1
    denominator = m.sum().clamp(min=1) if own_tokens is None else own_tokens
    loss = ((weights * factor)[:, None] * nll * m).sum() / denominator
    return loss, seq_logp, factor


def policy_gradient_loss(
    logits: torch.Tensor,
    input_ids: torch.Tensor,
    mask: torch.Tensor,
    advantages: torch.Tensor,
    old_logps: torch.Tensor,
    clip: float,
    kl: float,
    own_tokens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Online RL's loss over the player's own tokens (``weights.scheme: rl``).

    Per own token t of a sequence with advantage A: the ratio r = π(t)/π_old(t) to the
    round-start model (which played the games), the clipped surrogate −min(r·A, clip(r, 1±ε)·A),
    and a KL anchor to the same model, kl · (π_old/π − log(π_old/π) − 1) (non-negative, zero when
    π = π_old). Summed over own tokens and divided by their number (``own_tokens`` as in
    ``weighted_nll``). old_logps [B, T-1]: log π_old of each target token. Returns (loss, each
    sequence's mean own-token log-prob [B])."""
    targets = input_ids[:, 1:]
    m = mask[:, 1:].float()
    logp = -F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(), reduction="none").view_as(m)
    delta = (logp - old_logps) * m  # log r, 0 off the own tokens
    ratio = torch.exp(delta)
    a = advantages[:, None]
    surrogate = -torch.minimum(ratio * a, ratio.clamp(1 - clip, 1 + clip) * a)
    anchor = torch.exp(-delta) + delta - 1  # the k3 estimator of KL(π ‖ π_old) at sampled tokens
    denominator = m.sum().clamp(min=1) if own_tokens is None else own_tokens
    loss = ((surrogate + kl * anchor) * m).sum() / denominator
    return loss, (logp * m).sum(1) / m.sum(1).clamp(min=1)


# --------------------------------------------------------------------------- the steps


@dataclass
class _Row:
    ids: list[int]
    mask: list[int]
    weight: float
    own: int
    """Own target tokens (``mask[1:]``): what the row adds to its step's loss denominator."""
    sampled: list[tuple[int, list[float]]] = field(default_factory=list)
    """Parity: (position of the first content token, the sampler's log-prob of each content token)
    of each assistant turn whose sampled tokens line up with the trainer's (``_align_sampled``)."""
    unaligned: int = 0
    """Parity: assistant turns that carry the sampler's log-probs but do not line up."""
    ref_logp: float = 0.0
    """iw-SFT: mean own-token log-prob under the round-start model."""
    old_logps: list[float] | None = None
    """Online RL: log-prob of each target token (positions 1..T-1) under the round-start model."""


def _tokenize(examples: Sequence[TrainExample], tokenizer, stops: set[int], max_length: int):
    """Rows to train on, and how many examples were cut to ``max_length`` or left with no own token."""
    rows, skipped, truncated = [], 0, 0
    for ex in examples:
        ids, mask = hf_layer.assistant_mask(tokenizer, ex.messages, stops)
        sampled, unaligned = _align_sampled(mask, ex.sampled_logprobs, max_length)
        if len(ids) > max_length:
            truncated += 1
            ids, mask = ids[:max_length], mask[:max_length]
        if sum(mask[1:]) == 0:
            skipped += 1
            continue
        rows.append(_Row(ids, mask, ex.weight, sum(mask[1:]), sampled, unaligned))
    if not rows:
        raise TrainDataError("no example has any of the player's own tokens to learn from")
    return rows, skipped, truncated


def _turn_spans(mask: list[int]) -> list[tuple[int, int]]:
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


def _align_sampled(
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
    spans = _turn_spans(mask)
    if len(spans) != len(sampled):
        return [], carried
    aligned = [
        (start, lp)
        for (start, end), lp in zip(spans, sampled, strict=True)
        if lp is not None and end - start == len(lp) + 1 and end <= max_length
    ]
    return aligned, carried - len(aligned)


def _load_for_training(base: str, adapter: str | None, cfg: TrainConfig, dtype: torch.dtype):
    """The model with a trainable LoRA adapter (new, or ``adapter`` continued), or every weight
    trainable in fp32 master weights for full fine-tuning."""
    if adapter and not cfg.lora:
        raise TrainDataError("full fine-tuning continues from a full model, not an adapter")
    model, tokenizer = hf_layer.load(
        base, adapter, dtype if cfg.lora else torch.float32, device=None, trainable_adapter=True
    )
    if cfg.lora and not adapter:
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(
            r=cfg.lora_r,
            lora_alpha=cfg.lora_alpha,
            lora_dropout=cfg.lora_dropout,
            target_modules=cfg.target_modules,
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, lora)
    return model, tokenizer


def _batches(n: int, batch_size: int, micro_steps: int, gen: torch.Generator) -> list[list[int]]:
    """Shuffled micro-batches of example indices, epoch after epoch, ``micro_steps`` in all."""
    out: list[list[int]] = []
    while len(out) < micro_steps:
        order = torch.randperm(n, generator=gen).tolist()
        out += [order[i : i + batch_size] for i in range(0, n, batch_size)]
    return out[:micro_steps]


@dataclass(frozen=True)
class _Step:
    """One optimiser step as this process runs it."""

    micro_batches: list[list[int]]
    """This process's micro-batches (example indices), ``grad_accum`` of them."""
    own_tokens: int
    """Own tokens of every micro-batch of the step in every process: what its loss is divided by."""


def _plan(
    own: list[int], batch_size: int, grad_accum: int, micro_steps: int, nproc: int, rank: int, gen: torch.Generator
) -> list[_Step]:
    """The optimiser steps, at least ``micro_steps`` micro-batches in all and the same number of
    steps in every process (DDP needs every rank to step). A step takes ``grad_accum × nproc``
    consecutive shuffled micro-batches, process r the r-th of every ``nproc``, so N processes with
    batch b and accumulation a take the examples one process takes with batch N·a·b and no
    accumulation (when the examples divide into whole batches). Every process draws the same plan,
    so each knows the step's own-token count before running it, without communicating (as
    transformers' Trainer counts ``num_items_in_batch``)."""
    per_step = grad_accum * nproc
    n_steps = max(1, math.ceil(micro_steps / per_step))
    batches = _batches(len(own), batch_size, n_steps * per_step, gen)
    steps = []
    for s in range(n_steps):
        step = batches[s * per_step : (s + 1) * per_step]
        steps.append(_Step(step[rank::nproc], sum(own[i] for batch in step for i in batch)))
    return steps


def _pad(rows: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([r + [value] * (width - len(r)) for r in rows])


def _tensors(rows: list[_Row], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, own-token mask, attention mask), each [B, T], right-padded."""
    ids = _pad([r.ids for r in rows], pad_id).to(device)
    mask = _pad([r.mask for r in rows], 0).to(device)
    attention = _pad([[1] * len(r.ids) for r in rows], 0).to(device)
    return ids, mask, attention


@torch.no_grad()
def _token_logps(model, rows: list[_Row], pad_id: int, batch_size: int, device) -> list[list[float]]:
    """Log-prob of every target token (positions 1..T−1) of each example under ``model`` as it is
    now, in eval mode: online RL's π_old, iw-SFT's π_ref (``_own_mean``) and the trainer's side of
    the sampler–trainer parity (``sampler_parity``), all from this one pass."""
    was_training = model.training
    model.eval()
    out: list[list[float]] = []
    for i in range(0, len(rows), batch_size):
        chunk = rows[i : i + batch_size]
        ids, _, attention = _tensors(chunk, pad_id, device)
        logits = model(input_ids=ids, attention_mask=attention).logits[:, :-1].float()
        logp = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None])[..., 0]
        out += [row[: len(r.ids) - 1] for row, r in zip(logp.tolist(), chunk, strict=True)]
    model.train(was_training)
    return out


def _own_mean(logps: list[float], row: _Row) -> float:
    """Mean log-prob of a row's own tokens, from its ``_token_logps``."""
    return sum(lp for lp, m in zip(logps, row.mask[1:], strict=True) if m) / row.own


def sampler_parity(rows: Sequence[_Row], logps: Sequence[list[float]]) -> dict[str, float | int | None]:
    """How far the trainer's log-probs (``_token_logps`` of the round-start model, as loaded for
    training) are from the sampler's that played the games, over the turns that line up
    (``_align_sampled``). With d = log π_trainer − log π_sampler at each sampled token:

    - ``sampler_kl``: the mean of exp(d) − d − 1, the k3 estimator of KL(sampler ‖ trainer) per
      token — unbiased at tokens the sampler drew, and never negative;
    - ``sampler_logp_abs_diff``: the mean |d|.

    The two models are the same weights, so both are 0 up to float rounding unless the sampler and
    the trainer disagree on something that matters (template, tokenisation, temperature, adapter,
    dtype): see ``run.SAMPLER_KL_TOLERANCE``. TrainStats field names, ready to be merged."""
    d = [
        lp[start - 1 + j] - s  # the token at position t is scored at index t−1
        for row, lp in zip(rows, logps, strict=True)
        for start, sampled in row.sampled
        for j, s in enumerate(sampled)
    ]
    return {
        "sampler_kl": sum(math.expm1(x) - x for x in d) / len(d) if d else None,
        "sampler_logp_abs_diff": sum(abs(x) for x in d) / len(d) if d else None,
        "sampler_tokens": len(d),
        "sampler_turns": sum(len(row.sampled) for row in rows),
        "sampler_turns_not_comparable": sum(row.unaligned for row in rows),
    }


def _save(accelerator, model, tokenizer, out: Path, lora: bool) -> None:
    """Write to ``out.partial`` and rename, so ``out`` exists only when complete."""
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    accelerator.unwrap_model(model).save_pretrained(partial)
    if not lora:
        tokenizer.save_pretrained(partial)
    shutil.rmtree(out, ignore_errors=True)
    partial.rename(out)


def _micro_batch_loss(
    logits: torch.Tensor,
    input_ids: torch.Tensor,
    mask: torch.Tensor,
    picked: list[_Row],
    weights: WeightConfig | None,
    step_tokens: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A micro-batch's share of its optimiser step's loss (divided by the step's own tokens), the
    one place where the operators differ: online RL's clipped policy gradient on the advantages,
    or the weighted NLL (iw-SFT: each weight times its factor against π_ref). Returns (loss, each
    sequence's mean own-token log-prob [B], the factor [B] that multiplied the weights)."""
    device = logits.device
    w = torch.tensor([r.weight for r in picked], device=device)
    if weights is not None and weights.scheme == "rl":
        old_logps = _pad([r.old_logps for r in picked], 0.0).to(device)  # type: ignore[misc]
        rl = weights.rl
        loss, seq_logp = policy_gradient_loss(logits, input_ids, mask, w, old_logps, rl.clip, rl.kl, step_tokens)
        return loss, seq_logp, torch.ones_like(seq_logp)
    reweight = None
    if weights is not None and weights.scheme == "iw_sft":
        ref = torch.tensor([r.ref_logp for r in picked], device=device)
        reweight = lambda logp: iw_factor(logp, ref, weights.iw_temperature, weights.w_max)  # noqa: E731
    return weighted_nll(logits, input_ids, mask, w, reweight, step_tokens)


# --------------------------------------------------------------------------- checkpoints


def checkpoint_file(out: Path) -> Path:
    """Where a training into ``out`` keeps its checkpoint."""
    return out.with_name(out.name + ".checkpoint.pt")


def _fingerprint(examples: Sequence[TrainExample], **settings) -> str:
    """What a checkpoint must match to be continued: the data, the model and every setting."""
    data = json.dumps([ex.model_dump() for ex in examples] + [settings], sort_keys=True, default=str)
    return hashlib.sha256(data.encode()).hexdigest()


def _save_checkpoint(accelerator, model, optimizer, scheduler, path: Path, state: dict) -> None:
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return
    trainable = {n: p.detach().cpu() for n, p in accelerator.unwrap_model(model).named_parameters() if p.requires_grad}
    rng = {"cpu": torch.get_rng_state()} | (
        {"cuda": torch.cuda.get_rng_state_all()} if torch.cuda.is_available() else {}
    )
    blob = state | {"trainable": trainable, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}
    partial = path.with_name(path.name + ".partial")
    torch.save(blob | {"rng": rng}, partial)
    os.replace(partial, path)


def _load_checkpoint(accelerator, model, optimizer, scheduler, path: Path, fingerprint: str) -> dict | None:
    """The saved state (and the model, optimiser and scheduler set from it), or None when there is
    no usable checkpoint (none, unreadable, or for other data or settings: said in the log)."""
    if not path.exists():
        return None
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a torn or foreign file: train from the start
        log.warning("%s: unreadable training checkpoint (%s); training from the start", path, exc)
        return None
    if blob.get("fingerprint") != fingerprint:
        log.warning("%s: a checkpoint of other data or settings; training from the start", path)
        return None
    params = dict(accelerator.unwrap_model(model).named_parameters())
    with torch.no_grad():
        for name, value in blob["trainable"].items():
            params[name].copy_(value)
    optimizer.load_state_dict(blob["optimizer"])
    scheduler.load_state_dict(blob["scheduler"])
    torch.set_rng_state(blob["rng"]["cpu"])
    if "cuda" in blob["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(blob["rng"]["cuda"])
    log.info("%s: resuming training at step %d", path, blob["step"] + 1)
    return blob


# --------------------------------------------------------------------------- the trainer


def train(
    examples: Sequence[TrainExample],
    base: str,
    out: str | Path,
    cfg: TrainConfig,
    *,
    adapter: str | None = None,
    weights: WeightConfig | None = None,
    seed: int = 0,
    epochs: float | None = None,
    lr: float | None = None,
    on_step: Callable[[int, int, float], None] | None = None,
    resume: bool = False,
) -> TrainStats:
    """Fine-tune ``base`` (plus ``adapter`` when continuing a LoRA run) on ``examples`` and save
    the result to ``out`` (adapter, or full weights and tokenizer), atomically. With ``resume``,
    continue from the checkpoint of an interrupted call with the same arguments, if there is one;
    without, any checkpoint there is discarded."""
    if not any(m["role"] == "assistant" for ex in examples for m in ex.messages):
        raise TrainDataError("no example has any of the player's own tokens to learn from")
    device = default_device()
    with torch.random.fork_rng(devices=[torch.cuda.current_device()] if device == "cuda" else []):
        torch.manual_seed(seed)  # LoRA's initialisation draws from the (forked) global generator
        return _train(examples, base, Path(out), cfg, adapter, weights, seed, epochs, lr, on_step, device, resume)


def _train(examples, base, out, cfg, adapter, weights, seed, epochs, lr, on_step, device, resume) -> TrainStats:
    from accelerate import Accelerator

    started = time.perf_counter()
    dtype = pick_dtype(cfg.dtype, device)
    # Full fine-tuning keeps fp32 master weights and computes in bf16 where that is the dtype.
    bf16 = not cfg.lora and dtype == torch.bfloat16
    accelerator = Accelerator(gradient_accumulation_steps=cfg.grad_accum, cpu=device == "cpu")

    # 1. The model and the rows to train on.
    model, tokenizer = _load_for_training(base, adapter, cfg, dtype)
    stops = hf_layer.stop_ids(tokenizer, model.generation_config)
    rows, skipped, truncated = _tokenize(examples, tokenizer, stops, cfg.max_length)
    model.to(accelerator.device)
    pad_id = tokenizer.pad_token_id

    # 2. One pass of the round-start model over the examples, where something needs it: iw-SFT's
    # π_ref, online RL's π_old, and the parity with the sampler that played the games.
    iw = weights is not None and weights.scheme == "iw_sft"
    rl = weights is not None and weights.scheme == "rl"
    start_logps = [[] for _ in rows]
    if iw or rl or any(row.sampled for row in rows):
        start_logps = _token_logps(model, rows, pad_id, cfg.batch_size, accelerator.device)
    for row, logps in zip(rows, start_logps, strict=True):
        row.ref_logp = _own_mean(logps, row) if iw else 0.0
        row.old_logps = logps if rl else None
    parity = sampler_parity(rows, start_logps) if any(row.sampled or row.unaligned for row in rows) else {}
    if parity and accelerator.is_main_process:
        _log_parity(parity)
    del start_logps

    # 3. The plan: whole optimiser steps, each with its own-token count.
    n_epochs = epochs if epochs is not None else cfg.epochs
    micro_steps = math.ceil(n_epochs * math.ceil(len(rows) / cfg.batch_size))
    micro_steps = max(micro_steps, cfg.min_steps * cfg.grad_accum)
    nproc = accelerator.num_processes
    gen = torch.Generator().manual_seed(seed)
    own = [row.own for row in rows]
    steps = _plan(own, cfg.batch_size, cfg.grad_accum, micro_steps, nproc, accelerator.process_index, gen)

    # 4. The optimiser: AdamW, linear warm-up whose first step already moves ((s+1)/(w+1) of the peak).
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr or cfg.lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / (cfg.warmup_steps + 1)))
    # The scheduler stays out of accelerate, which would step it once per process at every
    # optimiser step; here it steps once per optimiser step, however many processes there are.
    model, optimizer = accelerator.prepare(model, optimizer)
    model.train()
    # Each micro-batch's loss is its share of the step's (divided by the step's own tokens), so the
    # shares add up to the step's loss. accelerate divides what it back-propagates by the
    # accumulation steps, and DDP (or DeepSpeed, FSDP) averages gradients over processes: undo both.
    undo = accelerator.gradient_accumulation_steps * nproc

    # 5. The steps, from the checkpoint of an interrupted call when there is one.
    ckpt = checkpoint_file(out)
    settings = {"base": base, "adapter": adapter, "train": cfg.model_dump(exclude={"checkpoint_steps"}), "seed": seed}
    settings |= {"weights": weights.model_dump() if weights else None, "epochs": epochs, "lr": lr, "nproc": nproc}
    settings |= {"loss": "step token mean"}  # checkpoints of the per-micro-batch mean are not continued
    fingerprint = _fingerprint(examples, **settings)
    saved = _load_checkpoint(accelerator, model, optimizer, scheduler, ckpt, fingerprint) if resume else None
    figures = {"losses": [], "nlls": [], "tokens": 0, "own_tokens": 0, "reweight_factors": []}
    figures |= saved["figures"] if saved else {}
    losses, nlls, reweight_factors = figures["losses"], figures["nlls"], figures["reweight_factors"]
    tokens, own_tokens = figures["tokens"], figures["own_tokens"]
    done = saved["step"] if saved else 0
    for s, step in enumerate(steps):
        if s < done:
            continue
        sums = torch.zeros(3, device=accelerator.device)  # this process's share of: loss, NLL, tokens
        for batch in step.micro_batches:
            picked = [rows[j] for j in batch]
            input_ids, mask, attention = _tensors(picked, pad_id, accelerator.device)
            with accelerator.accumulate(model), torch.autocast(accelerator.device.type, torch.bfloat16, enabled=bf16):
                logits = model(input_ids=input_ids, attention_mask=attention).logits
                loss, seq_logp, factor = _micro_batch_loss(logits, input_ids, mask, picked, weights, step.own_tokens)
                if not torch.isfinite(loss):
                    raise TrainingDiverged(
                        f"the loss is {loss.item()} at optimiser step {s + 1} (learning rate too high?); "
                        f"nothing was saved to {out}"
                    )
                accelerator.backward(loss * undo)
                optimizer.step()
                optimizer.zero_grad()
            if iw:
                reweight_factors += factor.tolist()
            own_per_row = torch.tensor([r.own for r in picked], device=accelerator.device)
            nll = -(seq_logp.detach() * own_per_row).sum() / step.own_tokens
            sums += torch.stack([loss.detach().float(), nll.float(), attention.sum().float()])
        if nproc > 1:
            sums = accelerator.reduce(sums, reduction="sum")
        scheduler.step()
        losses.append(sums[0].item())
        nlls.append(sums[1].item())
        tokens += int(sums[2].item())
        own_tokens += step.own_tokens
        if cfg.checkpoint_steps and len(losses) % cfg.checkpoint_steps == 0 and len(losses) < len(steps):
            figures = {"losses": losses, "nlls": nlls, "tokens": tokens, "own_tokens": own_tokens}
            figures |= {"reweight_factors": reweight_factors}
            state = {"fingerprint": fingerprint, "step": s + 1, "figures": figures}
            _save_checkpoint(accelerator, model, optimizer, scheduler, ckpt, state)
        if on_step:
            on_step(len(losses), len(steps), losses[-1])

    # 6. Save, and say what happened.
    _save(accelerator, model, tokenizer, out, cfg.lora)
    if accelerator.is_main_process:
        ckpt.unlink(missing_ok=True)
    seconds = time.perf_counter() - started
    return TrainStats(
        examples=len(rows),
        skipped_examples=skipped,
        truncated_examples=truncated,
        steps=len(losses),
        tokens=tokens,
        own_tokens=own_tokens,
        loss_first=losses[0] if losses else math.nan,
        loss_last=losses[-1] if losses else math.nan,
        nll_first=nlls[0] if nlls else math.nan,
        nll_last=nlls[-1] if nlls else math.nan,
        seconds=seconds,
        tokens_per_second=tokens / seconds if seconds else 0.0,
        mean_iw=sum(reweight_factors) / len(reweight_factors) if reweight_factors else None,
        losses=losses,
        **parity,
    )


def _log_parity(parity: dict) -> None:
    kl = parity["sampler_kl"]
    line = (
        f"sampler-trainer parity: KL {kl:.2e} per token, mean |Δ log p| {parity['sampler_logp_abs_diff']:.2e} "
        f"over {parity['sampler_tokens']} tokens of {parity['sampler_turns']} turns"
        if kl is not None
        else "sampler-trainer parity: no turn's sampled tokens line up with the trainer's"
    )
    line += f"; {parity['sampler_turns_not_comparable']} turns not comparable"
    if kl is not None and kl > SAMPLER_KL_TOLERANCE:
        log.warning("%s: above the tolerance %.0e, the sampler and the trainer disagree", line, SAMPLER_KL_TOLERANCE)
    else:
        log.info(line)


def save_stats(path: str | Path, stats: TrainStats) -> None:
    write_lines_atomic(path, [stats.model_dump_json()])


def read_stats(path: str | Path) -> TrainStats:
    try:
        return TrainStats.model_validate(json.loads(Path(path).read_text()))
    except (OSError, ValueError) as exc:
        raise TrainDataError(f"{path}: no training figures could be read: {exc}") from None
