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
(``batches.plan``, as transformers' Trainer counts ``num_items_in_batch``): batch b × accumulation a × p
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

The trainer in parts: ``batches.py`` prepares the data (rows, the plan of steps, tensors),
``losses.py`` holds the one log-prob helper (``token_logps``: the head only at the targets, a
shared head run once per step) and the losses, and this module runs them. ``train`` reads top to bottom:
tokenise the examples, load the model, score them with the round-start model where needed, plan
the steps, run them (``_Run.step``: each micro-batch's share of the loss back-propagated, the
gradient clipped to ``train.max_grad_norm``, the optimiser stepped), save atomically. Every step
records its gradient norm (before clipping), and under online RL cleanrl's vital signs: the
approximate KL to the round-start model, the share of own tokens whose ratio was clipped, and the
policy's entropy at the own tokens (``TrainStats``).

With ``train.checkpoint_steps: N`` it also saves, every N optimiser steps, everything needed to go
on — accelerate's ``save_state`` (the optimiser, the scheduler, every process's RNG; only the
trainable weights of the model) and the position in the plan with the figures so far — behind a
fingerprint of the data, the model and every setting (see "checkpoints" below); with ``resume`` a
new call on the same data, model and settings continues from it and ends with the same weights as
a run never interrupted. The checkpoint is removed once the output is saved. It runs on
accelerate, so ``accelerate launch -m parlay sft …`` runs this same code on several GPUs (DDP, or
DeepSpeed/FSDP through an accelerate config); in a single process it runs on CPU or one GPU (the
shared head is used in a single process only). LoRA (peft) by default, every weight with ``lora:
false``. Where the dtype is bf16, the trainable weights stay float32 and the compute is bf16
(``mixed_precision``). Memory is bounded by ``train.micro_batch_tokens`` (``micro_batch_budget``):
a step's micro-batches of long examples are cut smaller, which leaves the step and its gradient as
they were; on CPU, grouped-query attention runs without repeated keys and values
(``grouped_query_sdpa``). All randomness (LoRA's initialisation, the order of examples) comes from
``seed``; the caller's global random state is left as it was.
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
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch

from parlay.agents import hf_layer
from parlay.agents.hf_layer import default_device, pick_dtype
from parlay.config import TrainConfig, WeightConfig
from parlay.episode import write_lines_atomic
from parlay.improve import TrainDataError, TrainingDiverged
from parlay.improve.batches import Row, collate, plan, shared_head, tokenize, turn_spans
from parlay.improve.examples import TrainExample
from parlay.improve.losses import StepHead, micro_batch_loss, policy_gradient_loss, token_logps, weighted_nll
from parlay.run import SAMPLER_KL_TOLERANCE, TrainStats

__all__ = [
    "checkpoint_file",
    "policy_gradient_loss",
    "read_stats",
    "save_stats",
    "train",
    "turn_logps",
    "weighted_nll",
]

log = logging.getLogger(__name__)

StepHook = Callable[[int, int, float, int], None]
"""(steps done, steps in all, the loss of the step just done, the tokens it processed)."""


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
    on_step: StepHook | None = None,
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
        run = _Run(examples, base, Path(out), cfg, adapter, weights, seed, epochs, lr, device)
        return run.train(on_step, resume)


class _Run:
    """One call of ``train``: its settings, then ``train`` in the order it happens."""

    def __init__(self, examples, base, out, cfg, adapter, weights, seed, epochs, lr, device) -> None:
        from accelerate import Accelerator

        self.examples, self.base, self.out, self.cfg, self.adapter = examples, base, out, cfg, adapter
        self.weights, self.seed, self.epochs, self.lr = weights, seed, epochs, lr
        self.dtype = pick_dtype(cfg.dtype, device)
        # Where the dtype is bf16, trainable weights stay float32 and the compute is bf16
        # (``mixed_precision``): full fine-tuning's master weights, LoRA's adapter.
        self.bf16 = self.dtype == torch.bfloat16
        # The dtype the activations are in: full fine-tuning without autocast computes in its float32
        # weights' dtype.
        compute = self.dtype if self.bf16 or cfg.lora else torch.float32
        self.micro_batch_tokens = micro_batch_budget(cfg.micro_batch_tokens, compute)
        # Accumulation is done here (``_step``), so accelerate neither divides nor counts micro-batches.
        self.accelerator = Accelerator(cpu=device == "cpu")
        self.scheme = weights.scheme if weights is not None else "uniform"

    def train(self, on_step: StepHook | None, resume: bool) -> TrainStats:
        from accelerate import DistributedType

        acc, cfg, started = self.accelerator, self.cfg, time.perf_counter()

        # 1. The model and the rows to train on.
        model, tokenizer = _load_for_training(self.base, self.adapter, cfg, self.dtype)
        stops = hf_layer.stop_ids(tokenizer, model.generation_config)
        rows, skipped, truncated = tokenize(self.examples, tokenizer, stops, cfg.max_length)
        model.to(acc.device)
        self.pad_id = tokenizer.pad_token_id
        # A shared head's gradient is sent after the step's micro-batches: a plain process only
        # (DeepSpeed steps at every backward; FSDP gathers weights in its own hooks).
        self.share = acc.distributed_type == DistributedType.NO and _can_share_heads(model)

        # 2. One pass of the round-start model, where something needs it: iw-SFT's π_ref, online
        # RL's π_old, and the parity with the sampler that played the games.
        parity = self.score_at_start(model, rows)

        # 3. The plan: whole optimiser steps, each with its own-token count.
        n_epochs = self.epochs if self.epochs is not None else cfg.epochs
        micro_steps = math.ceil(n_epochs * math.ceil(len(rows) / cfg.batch_size))
        micro_steps = max(micro_steps, cfg.min_steps * cfg.grad_accum)
        gen = torch.Generator().manual_seed(self.seed)
        nproc = acc.num_processes
        steps = plan(
            rows, cfg.batch_size, cfg.grad_accum, micro_steps, nproc, acc.process_index, gen, self.micro_batch_tokens
        )

        # 4. The optimiser: AdamW, linear warm-up whose first step already moves ((s+1)/(w+1) of the peak).
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=self.lr or cfg.lr, weight_decay=0.0)
        warmup = cfg.warmup_steps
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / (warmup + 1)))
        # The scheduler stays out of ``prepare`` (which would step it once per process at every
        # optimiser step); it is checkpointed with the rest all the same.
        model, optimizer = acc.prepare(model, optimizer)
        acc.register_for_checkpointing(scheduler)
        model.train()

        # 5. The steps, from the checkpoint of an interrupted call when there is one.
        self.fingerprint = _fingerprint(self.examples, **self.settings())
        fig = _load_checkpoint(acc, model, checkpoint_file(self.out), self.fingerprint) if resume else None
        fig = fig or {"losses": [], "nlls": [], "tokens": 0, "own_tokens": 0, "reweight_factors": [], "grad_norms": []}
        fig |= {} if self.scheme != "rl" else {k: fig.get(k, []) for k in ("approx_kls", "clip_fractions", "entropies")}
        for s, step in enumerate(steps):
            if s < len(fig["losses"]):
                continue
            figures = self.step(model, optimizer, params, rows, step, s)
            scheduler.step()
            for key, value in figures.items():
                fig[key] = fig[key] + value if isinstance(value, int | list) else [*fig[key], value]
            fig["own_tokens"] += step.own_tokens
            done = len(fig["losses"])
            if cfg.checkpoint_steps and done % cfg.checkpoint_steps == 0 and done < len(steps):
                _save_checkpoint(acc, model, checkpoint_file(self.out), {"fingerprint": self.fingerprint} | fig)
            if on_step:
                on_step(done, len(steps), fig["losses"][-1], figures["tokens"])

        # 6. Save, and say what happened.
        _save(acc, model, tokenizer, self.out, cfg.lora)
        if acc.is_main_process:
            _remove_checkpoint(checkpoint_file(self.out))
        return self.stats(fig, rows, skipped, truncated, parity, time.perf_counter() - started)

    def step(self, model, optimizer, params, rows: list[Row], step, s: int) -> dict:
        """One optimiser step: each micro-batch back-propagates its share of the step's loss
        (``losses``), the gradient is clipped to ``max_grad_norm``, the optimiser steps. DDP (or
        DeepSpeed, FSDP) averages gradients over processes: the shares are multiplied back. Returns
        the step's figures, summed over processes."""
        acc, nproc = self.accelerator, self.accelerator.num_processes
        sums = torch.zeros(6, device=acc.device)  # this process's: loss, NLL, tokens, RL's KL, clipped, entropy
        factors: list[float] = []
        no_autocast = torch.autocast(acc.device.type, enabled=False)  # backward runs in the forward's dtypes
        # One autocast for the whole step: each weight is cast to bf16 once, for the head and every
        # micro-batch, and the cast copies go when it ends, before the optimiser steps.
        with mixed_precision(model, acc.device.type, self.bf16), grouped_query_sdpa(acc.device.type):
            head = self.step_head(model, [rows[j] for batch_rows in step.micro_batches for j in batch_rows])
            for i, batch_rows in enumerate(step.micro_batches):
                picked = [rows[j] for j in batch_rows]
                batch = collate(picked, self.pad_id, acc.device, self.share, head=head.length if head else None)
                last = i == len(step.micro_batches) - 1
                with nullcontext() if last else acc.no_sync(model):
                    loss, seq_logp, factor, rl = micro_batch_loss(
                        model, batch, picked, self.weights, step.own_tokens, head
                    )
                    if not torch.isfinite(loss):
                        raise TrainingDiverged(
                            f"the loss is {loss.item()} at optimiser step {s + 1} (learning rate too high?); "
                            f"nothing was saved to {self.out}"
                        )
                    with no_autocast:
                        acc.backward(loss * nproc)
                factors += factor.tolist() if self.scheme == "iw_sft" else []
                own = torch.tensor([r.own for r in picked], device=acc.device)
                nll = -(seq_logp.detach() * own).sum() / step.own_tokens
                rl_sums = [rl.approx_kl, rl.clipped, rl.entropy] if rl else [0.0, 0.0, 0.0]
                sums += torch.tensor(
                    [loss.item(), nll.item(), batch.attention.sum().item(), *rl_sums], device=acc.device
                )
            if head is not None:
                with no_autocast:
                    head.backward()
        max_norm = self.cfg.max_grad_norm or math.inf  # the norm is measured either way
        grad_norm = acc.clip_grad_norm_(params, max_norm)
        optimizer.step()
        optimizer.zero_grad()
        if nproc > 1:
            sums = acc.reduce(sums, reduction="sum")
        loss, nll, tokens, kl, clipped, entropy = sums.tolist()
        figures = {"losses": loss, "nlls": nll, "tokens": int(tokens), "grad_norms": float(grad_norm)}
        figures |= {"reweight_factors": factors}
        if self.scheme == "rl":  # per own token of the step
            n = step.own_tokens
            figures |= {"approx_kls": kl / n, "clip_fractions": clipped / n, "entropies": entropy / n}
        return figures

    def step_head(self, model, step_rows: list[Row]) -> StepHead | None:
        """The head all the step's rows share, run once for the step (``losses.StepHead``); None
        where heads are not shared or the rows have none worth sharing."""
        p = shared_head(step_rows) if self.share and len(step_rows) > 1 else 0
        if not p:
            return None
        return StepHead.run(model, torch.tensor([step_rows[0].ids[:p]], device=self.accelerator.device))

    def score_at_start(self, model, rows: list[Row]) -> dict:
        """Where needed, each row's own-token log-probs under the round-start model, from one pass:
        iw-SFT's π_ref (``Row.ref_logp``), online RL's π_old (``Row.old_logps``), and the sampler's
        parity (returned: TrainStats fields, empty when no example carried the sampler's log-probs)."""
        iw, rl = self.scheme == "iw_sft", self.scheme == "rl"
        if not (iw or rl or any(row.sampled for row in rows)):
            return sampler_parity(rows, [[] for _ in rows]) if any(row.unaligned for row in rows) else {}
        device = self.accelerator.device
        with mixed_precision(model, device.type, self.bf16):  # the arithmetic the steps will use
            logps = _token_logps(model, rows, self.pad_id, self.cfg.batch_size, device, self.share)
        for row, lp in zip(rows, logps, strict=True):
            row.ref_logp = sum(lp) / len(lp) if iw else 0.0
            row.old_logps = lp if rl else None
        parity = sampler_parity(rows, logps) if any(row.sampled or row.unaligned for row in rows) else {}
        if parity and self.accelerator.is_main_process:
            _log_parity(parity)
        return parity

    def settings(self) -> dict:
        """What else than the data a checkpoint must match to be continued."""
        # The cut of micro-batches leaves every step as it was (but for the dropout masks drawn,
        # where dropout is on): a budget lowered after running out of memory continues the checkpoint.
        cfg = self.cfg.model_dump(exclude={"checkpoint_steps", "micro_batch_tokens"})
        return {
            "base": self.base, "adapter": self.adapter, "train": cfg, "seed": self.seed, "epochs": self.epochs,
            "weights": self.weights.model_dump() if self.weights else None, "lr": self.lr,
            "nproc": self.accelerator.num_processes,
            "plan": "length-sorted steps",  # checkpoints of earlier plans are not continued
        }  # fmt: skip

    def stats(self, fig: dict, rows, skipped: int, truncated: int, parity: dict, seconds: float) -> TrainStats:
        losses, nlls, factors = fig["losses"], fig["nlls"], fig["reweight_factors"]
        return TrainStats(
            examples=len(rows),
            skipped_examples=skipped,
            truncated_examples=truncated,
            steps=len(losses),
            tokens=fig["tokens"],
            own_tokens=fig["own_tokens"],
            loss_first=losses[0] if losses else math.nan,
            loss_last=losses[-1] if losses else math.nan,
            nll_first=nlls[0] if nlls else math.nan,
            nll_last=nlls[-1] if nlls else math.nan,
            seconds=seconds,
            tokens_per_second=fig["tokens"] / seconds if seconds else 0.0,
            mean_iw=sum(factors) / len(factors) if factors else None,
            losses=losses,
            grad_norms=fig["grad_norms"],
            approx_kls=fig.get("approx_kls"),
            clip_fractions=fig.get("clip_fractions"),
            entropies=fig.get("entropies"),
            **parity,
        )


# --------------------------------------------------------------------------- the model


def micro_batch_budget(setting: int | str | None, dtype: torch.dtype) -> int | None:
    """The most padded positions per micro-batch that ``train.micro_batch_tokens`` allows, for
    activations in ``dtype`` (the compute dtype: bf16 under autocast, else the trained weights').

    ``auto``: 1024 positions where the compute dtype is 16-bit, so 512 in float32 — the activations a
    micro-batch keeps for its backward pass take about the same bytes in both (the warm start of
    ``configs/cpu-quickstart.yaml`` peaks at 2.6 GB in bf16 and 2.3 GB in float32 this way in
    ``bench/train.py``; 3.04 GB in float32 at 1024, docs/RESULTS.md). An int is itself; None:
    micro-batches are not cut.
    """
    return 2048 // dtype.itemsize if setting == "auto" else setting


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
        with hf_layer.peft_quiet():
            model = get_peft_model(model, lora)
    return model, tokenizer


@contextmanager
def mixed_precision(model, device_type: str, bf16: bool):
    """bf16 compute over float32 trainable weights (``torch.autocast``), or nothing (float32).

    The weights the optimiser updates stay float32 (full fine-tuning's master weights, or LoRA's
    adapter, which peft keeps in float32 over a bf16 base); autocast casts them to bf16 once per
    context and the gradients flow back to them in float32. peft's own cast of an adapted layer's
    input to the adapter's dtype is turned off here: under autocast it is not needed, and without
    it the bf16 input the base layer already keeps for the backward pass is the adapter's too,
    instead of a float32 copy per adapted layer (measured on the quickstart's longest warm-start
    micro-batch: saved activations 2.06 → 1.43 GB, docs/RESULTS.md). With ``lora_dropout`` the
    adapter keeps its dropped-out input and mask besides, as it does in float32. Autocast's
    cast copies of the weights live as long as the context: the trainer enters it once per
    optimiser step, and runs the backward passes with autocast off."""
    if not bf16:
        yield
        return
    from peft.helpers import disable_input_dtype_casting

    with disable_input_dtype_casting(model), torch.autocast(device_type, torch.bfloat16):
        yield


@contextmanager
def grouped_query_sdpa(device_type: str):
    """On CPU, transformers' SDPA attention attends to grouped-query keys and values as they are
    (``enable_gqa``) instead of repeating them to every query head, as it otherwise does whenever a
    padding mask is given; a training forward then keeps no repeated copies for its backward pass
    (the quickstart's float32 warm start cut at 1024 positions: peak 3.20 → 3.04 GB, 155 → 150 s,
    docs/RESULTS.md).

    torch's CPU flash kernel takes a mask with grouped heads (checked with torch 2.13, so older
    versions are left as they are); with a mask, CUDA's kernels would fall back to the math kernel,
    so on other devices nothing changes. The switch is transformers' own,
    ``TRANSFORMERS_SDPA_FORCE_GQA``, read at every attention call: it is set for the context and
    removed after it; a value the user set (``0`` turns this off) is left as it is. The environment
    is the process's: CPU attention in another thread meanwhile takes the same path, which computes
    the same up to rounding."""
    from transformers.utils.import_utils import is_torch_greater_or_equal

    name = "TRANSFORMERS_SDPA_FORCE_GQA"
    if device_type != "cpu" or not is_torch_greater_or_equal("2.13", accept_dev=True) or name in os.environ:
        yield
        return
    os.environ[name] = "1"
    try:
        yield
    finally:
        os.environ.pop(name, None)


def _can_share_heads(model) -> bool:
    """Whether a shared head can be run once and its cache reused for every row
    (``losses.StepHead``, ``losses.shared_forward``): every layer attends to the whole sequence (a
    sliding window's cache keeps only its last tokens) and keeps plain keys and values (no layer
    that shares another's, or keeps more)."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    from parlay.agents.hf_engine import sliding_window

    try:
        plain = all(type(layer) is DynamicLayer for layer in DynamicCache(config=model.config).layers)
        return plain and sliding_window(model.config) is None
    except Exception:  # an attention kind the decoder does not know: run every row whole
        return False


def turn_logps(
    examples: Sequence[TrainExample], base: str, adapter: str | None, cfg: TrainConfig
) -> list[list[list[float]]]:
    """Per example, per assistant turn, the log-prob (nats) of each of the turn's tokens (its
    content and its end-of-turn token: what training imitates) under ``base`` plus ``adapter``
    (merged), the examples tokenised, masked and cut to ``cfg.max_length`` as the trainer does
    them; examples left with no own token are left out. ``TrainDataError``: none has any."""
    device = default_device()
    model, tokenizer = hf_layer.load(base, adapter, pick_dtype(cfg.dtype, device), device=device)
    stops = hf_layer.stop_ids(tokenizer, model.generation_config)
    rows, _, _ = tokenize(examples, tokenizer, stops, cfg.max_length)
    logps = _token_logps(model, rows, tokenizer.pad_token_id, cfg.batch_size, device, _can_share_heads(model))
    out = []
    for row, lp in zip(rows, logps, strict=True):
        turns, at = [], 0
        for start, end in turn_spans(row.mask):
            turns.append(lp[at : at + end - start])
            at += end - start
        out.append(turns)
    return out


@torch.no_grad()
def _token_logps(model, rows: list[Row], pad_id: int, batch_size: int, device, share: bool) -> list[list[float]]:
    """Log-prob of each own token of each row (in order) under ``model`` as it is now, in eval mode;
    with ``share``, a micro-batch's shared head run once (``_can_share_heads``)."""
    was_training = model.training
    model.eval()
    out: list[list[float]] = []
    for i in range(0, len(rows), batch_size):
        chunk = rows[i : i + batch_size]
        batch = collate(chunk, pad_id, device, share)
        logp, _ = token_logps(model, batch)
        out += [logp[batch.row == b].tolist() for b in range(len(chunk))]
    model.train(was_training)
    return out


def sampler_parity(rows: Sequence[Row], logps: Sequence[list[float]]) -> dict[str, float | int | None]:
    """How far the trainer's log-probs (``_token_logps`` of the round-start model, as loaded for
    training) are from the sampler's that played the games, over the turns that line up
    (``batches.align_sampled``). With d = log π_trainer − log π_sampler at each sampled token:

    - ``sampler_kl``: the mean of exp(d) − d − 1, the k3 estimator of KL(sampler ‖ trainer) per
      token — unbiased at tokens the sampler drew, and never negative;
    - ``sampler_logp_abs_diff``: the mean |d|.

    The two models are the same weights, so both are 0 up to float rounding unless the sampler and
    the trainer disagree on something that matters (template, tokenisation, temperature, adapter,
    dtype): see ``run.SAMPLER_KL_TOLERANCE``. TrainStats field names, ready to be merged."""
    d = []
    for row, lp in zip(rows, logps, strict=True):
        at = dict(zip(row.own_positions, lp, strict=True)) if lp else {}
        d += [at[start + j] - s for start, sampled in row.sampled for j, s in enumerate(sampled)]
    return {
        "sampler_kl": sum(math.expm1(x) - x for x in d) / len(d) if d else None,
        "sampler_logp_abs_diff": sum(abs(x) for x in d) / len(d) if d else None,
        "sampler_tokens": len(d),
        "sampler_turns": sum(len(row.sampled) for row in rows),
        "sampler_turns_not_comparable": sum(row.unaligned for row in rows),
    }


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


# --------------------------------------------------------------------------- checkpoints
#
# accelerate's ``save_state``/``load_state`` write and read the optimiser, the scheduler (registered
# for checkpointing) and every process's RNG, and the model under DeepSpeed or FSDP; for a plain or
# DDP model a hook keeps only the trainable weights (a LoRA adapter is megabytes, the base model
# gigabytes, and the base is the file it was loaded from). Beside them, ``trainer.json`` holds the
# fingerprint (data, model, every setting), the position in the plan and the figures so far; it is
# read first, so a checkpoint of other data or settings is never loaded. A checkpoint is written to
# ``OUT.checkpoint.partial`` and renamed over the last one (kept as ``.old`` until then), so a kill
# at any moment leaves a complete checkpoint or none.

TRAINABLE = "trainable.safetensors"
STATE = "trainer.json"


def checkpoint_file(out: Path) -> Path:
    """Where a training into ``out`` keeps its checkpoint (a folder)."""
    return out.with_name(out.name + ".checkpoint")


def _fingerprint(examples: Sequence[TrainExample], **settings) -> str:
    """What a checkpoint must match to be continued: the data, the model and every setting."""
    data = json.dumps([ex.model_dump() for ex in examples] + [settings], sort_keys=True, default=str)
    return hashlib.sha256(data.encode()).hexdigest()


def _trainable_hooks(accelerator):
    """Save and load hooks that write only the trainable weights of a plain or DDP model."""
    from safetensors.torch import load_file, save_file

    def save(models, weights, folder):
        if weights:  # accelerate's copy of every weight: not written
            weights.pop()
            unwrapped = accelerator.unwrap_model(models[0])
            trainable = {n: p.detach().cpu().contiguous() for n, p in unwrapped.named_parameters() if p.requires_grad}
            if accelerator.is_main_process:
                save_file(trainable, str(Path(folder) / TRAINABLE))

    def load(models, folder):
        if models:
            model = accelerator.unwrap_model(models.pop())
            params = dict(model.named_parameters())
            with torch.no_grad():
                for name, value in load_file(str(Path(folder) / TRAINABLE)).items():
                    params[name].copy_(value)

    return accelerator.register_save_state_pre_hook(save), accelerator.register_load_state_pre_hook(load)


@contextmanager
def _trainable_only(accelerator):
    """While inside, accelerate's save_state/load_state write and read only the trainable weights."""
    handles = _trainable_hooks(accelerator)
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _save_checkpoint(accelerator, model, path: Path, state: dict) -> None:
    partial = path.with_name(path.name + ".partial")
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
    accelerator.wait_for_everyone()
    with _trainable_only(accelerator):
        accelerator.save_state(str(partial))
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return
    write_lines_atomic(partial / STATE, [json.dumps(state)])
    old = path.with_name(path.name + ".old")
    if path.exists():
        shutil.rmtree(old, ignore_errors=True)
        path.rename(old)
    partial.rename(path)
    shutil.rmtree(old, ignore_errors=True)


def _load_checkpoint(accelerator, model, path: Path, fingerprint: str) -> dict | None:
    """The figures so far (and the model, optimiser, scheduler and RNG set from the checkpoint), or
    None when there is no usable checkpoint (none, unreadable, or of other data or settings: said in
    the log)."""
    folder = next((p for p in (path, path.with_name(path.name + ".old")) if p.exists()), None)
    if folder is None:
        return None
    try:
        state = json.loads((folder / STATE).read_text())
    except (OSError, ValueError) as exc:  # a torn or foreign folder: train from the start
        log.warning("%s: unreadable training checkpoint (%s); training from the start", folder, exc)
        return None
    if state.pop("fingerprint", None) != fingerprint:
        log.warning("%s: a checkpoint of other data or settings; training from the start", folder)
        return None
    with _trainable_only(accelerator):
        accelerator.load_state(str(folder))
    log.info("%s: resuming training at step %d", folder, len(state["losses"]) + 1)
    return state


def _remove_checkpoint(path: Path) -> None:
    for p in (path, path.with_name(path.name + ".old"), path.with_name(path.name + ".partial")):
        shutil.rmtree(p, ignore_errors=True)


# --------------------------------------------------------------------------- figures


def save_stats(path: str | Path, stats: TrainStats) -> None:
    write_lines_atomic(path, [stats.model_dump_json()])


def read_stats(path: str | Path) -> TrainStats:
    try:
        return TrainStats.model_validate(json.loads(Path(path).read_text()))
    except (OSError, ValueError) as exc:
        raise TrainDataError(f"{path}: no training figures could be read: {exc}") from None
