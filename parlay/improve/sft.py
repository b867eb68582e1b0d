"""The weighted, assistant-only SFT trainer (filtered behaviour cloning and its weighted kin).

The loss (``weighted_nll``) is the negative log-likelihood of the player's own accepted turns,
token by token, each example scaled by its weight: uniform for the paper's filtered BC, AWR or
judge weights computed before training, or iw-SFT's importance weight recomputed at every step
against the frozen round-start model. The partner's turns, the system prompt and the chat
template's role headers are context only (mask 0).

Built on accelerate, so ``accelerate launch -m parlay sft …`` runs this same code on several GPUs
(DDP, or DeepSpeed/FSDP through an accelerate config); in a single process it runs on CPU or one
GPU. LoRA (peft) by default, every weight with ``lora: false``.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ValidationError

from parlay.agents.hf import pick_dtype
from parlay.agents.models import resolve
from parlay.config import TrainConfig, WeightConfig
from parlay.episode import write_lines_atomic
from parlay.improve import TrainDataError
from parlay.improve.weights import iw_factor
from parlay.protocol import ChatMessage

log = logging.getLogger(__name__)


class TrainExample(BaseModel):
    """One kept player-episode as the trainer reads it (a line of ``train.jsonl``)."""

    messages: list[ChatMessage]
    weight: float = 1.0
    reward: float = 0.0
    episode_id: str = ""
    player: str = ""
    rating: float | None = None
    """The judge's 0-10 rating, when a judge rated it."""


def write_examples(path: str | Path, examples: Sequence[TrainExample]) -> None:
    write_lines_atomic(path, (e.model_dump_json() for e in examples))


def read_examples(path: str | Path) -> list[TrainExample]:
    path = Path(path)
    out = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                out.append(TrainExample.model_validate_json(line))
            except ValidationError as exc:
                raise TrainDataError(f"{path}:{n}: not a training example: {exc.errors()[0]['msg']}") from None
    return out


# --------------------------------------------------------------------------- tokens and the loss


def _render(tokenizer, messages: Sequence[ChatMessage], generation_prompt: bool) -> list[int]:
    ids = tokenizer.apply_chat_template(
        list(messages), add_generation_prompt=generation_prompt, tokenize=True, return_dict=False
    )
    if not isinstance(ids, list):  # some tokenizers return a BatchEncoding whatever is asked
        ids = ids["input_ids"]
    return list(ids)


def stop_ids(tokenizer) -> set[int]:
    ids = {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")}
    return {t for t in ids if isinstance(t, int) and t >= 0 and t != tokenizer.unk_token_id}


def assistant_mask(tokenizer, messages: Sequence[ChatMessage]) -> tuple[list[int], list[int]]:
    """(input_ids, mask) of a whole conversation; mask is 1 exactly on the tokens of each assistant
    turn's content and the end-of-turn token that closes it.

    Spans are found by rendering the conversation up to each assistant turn with the generation
    prompt (where the assistant starts writing) and up to its end; the chat template must render
    every prefix of a conversation as a prefix of the whole, which is checked."""
    ids = _render(tokenizer, messages, generation_prompt=False)
    mask = [0] * len(ids)
    stops = stop_ids(tokenizer)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = len(_render(tokenizer, messages[:i], generation_prompt=True))
        upto = _render(tokenizer, messages[: i + 1], generation_prompt=False)
        if ids[: len(upto)] != upto or len(upto) <= start:
            raise TrainDataError("the chat template does not render a conversation's prefixes as prefixes")
        end = len(upto)
        for j in range(start, end):
            if ids[j] in stops:
                end = j + 1
                break
        mask[start:end] = [1] * (end - start)
    return ids, mask


def weighted_nll(
    logits: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor, weights: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted token-level NLL of the player's own tokens, and each sequence's mean log-prob.

    logits [B, T, V]; input_ids, mask [B, T] (mask 1 on own assistant tokens); weights [B].
    Returns (loss: scalar, seq_logp: [B])."""
    targets = input_ids[:, 1:]  # [B, T-1]: token t+1 is predicted at t
    m = mask[:, 1:].float()  # [B, T-1]
    nll = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(), reduction="none")
    nll = nll.view_as(m)  # [B, T-1]
    own = m.sum(1).clamp(min=1)  # [B]
    seq_logp = -(nll * m).sum(1) / own  # [B]
    loss = (weights[:, None] * nll * m).sum() / m.sum().clamp(min=1)
    return loss, seq_logp


# --------------------------------------------------------------------------- the trainer


@dataclass
class TrainStats:
    examples: int
    skipped_examples: int
    """Examples with no own tokens left (after cutting to max_length), not trained on."""
    truncated_examples: int
    steps: int
    tokens: int
    """Tokens processed (all positions), over all passes."""
    own_tokens: int
    """Tokens in the loss, over all passes."""
    loss_first: float
    loss_last: float
    nll_first: float
    nll_last: float
    """Unweighted NLL of own tokens in the first and last optimiser steps."""
    seconds: float
    tokens_per_second: float
    mean_iw: float | None = None
    """iw-SFT: mean importance factor over the run."""
    losses: list[float] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def _load(base: str, adapter: str | None, cfg: TrainConfig, device: str):
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    path = resolve(base)
    dtype = pick_dtype(cfg.dtype, device, training=True)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    # Full fine-tuning keeps fp32 master weights and lets autocast run in bf16.
    load_dtype = dtype if cfg.lora else torch.float32
    model = AutoModelForCausalLM.from_pretrained(path, dtype=load_dtype)
    if cfg.lora:
        if adapter:
            model = PeftModel.from_pretrained(model, adapter, is_trainable=True)
        else:
            lora = LoraConfig(
                r=cfg.lora_r,
                lora_alpha=cfg.lora_alpha,
                lora_dropout=cfg.lora_dropout,
                target_modules=cfg.target_modules,
                task_type="CAUSAL_LM",
            )
            model = get_peft_model(model, lora)
    elif adapter:
        raise TrainDataError("full fine-tuning continues from a full model, not an adapter")
    return model, tokenizer, dtype


def _batches(n: int, batch_size: int, micro_steps: int, seed: int) -> list[list[int]]:
    """Shuffled micro-batches of example indices, epoch after epoch, ``micro_steps`` in all."""
    gen = torch.Generator().manual_seed(seed)
    out: list[list[int]] = []
    while len(out) < micro_steps:
        order = torch.randperm(n, generator=gen).tolist()
        out += [order[i : i + batch_size] for i in range(0, n, batch_size)]
    return out[:micro_steps]


def _pad(rows: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([r + [value] * (width - len(r)) for r in rows])


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
) -> TrainStats:
    """Fine-tune ``base`` (plus ``adapter`` when continuing a LoRA run) on ``examples`` and save
    the result to ``out`` (adapter, or full weights and tokenizer), atomically."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    if not any(m["role"] == "assistant" for ex in examples for m in ex.messages):
        raise TrainDataError("no example has any of the player's own tokens to learn from")
    start_time = time.perf_counter()
    iw = weights is not None and weights.scheme == "iw_sft"
    device = "cuda" if torch.cuda.is_available() else "cpu"
    # One process may train several times with different settings (warm start, rounds, tests);
    # accelerate keeps them in a process-wide singleton, so start each training afresh.
    AcceleratorState._reset_state()
    accelerator = Accelerator(
        gradient_accumulation_steps=cfg.grad_accum,
        cpu=device == "cpu",
        mixed_precision="bf16" if not cfg.lora and pick_dtype(cfg.dtype, device, True) == torch.bfloat16 else "no",
    )
    torch.manual_seed(seed)
    model, tokenizer, _ = _load(base, adapter, cfg, device)

    rows, skipped, truncated = [], 0, 0
    for ex in examples:
        ids, mask = assistant_mask(tokenizer, ex.messages)
        if len(ids) > cfg.max_length:
            truncated += 1
            ids, mask = ids[: cfg.max_length], mask[: cfg.max_length]
        if sum(mask[1:]) == 0:
            skipped += 1
            continue
        rows.append({"ids": ids, "mask": mask, "weight": ex.weight})
    if not rows:
        raise TrainDataError("no example has any of the player's own tokens to learn from")

    model.to(accelerator.device)
    if iw:
        rows_ref = _mean_logps(model, rows, tokenizer.pad_token_id, cfg.batch_size, accelerator.device)
        for row, ref in zip(rows, rows_ref, strict=True):
            row["ref_logp"] = ref

    n_epochs = epochs if epochs is not None else cfg.epochs
    micro_steps = math.ceil(n_epochs * math.ceil(len(rows) / cfg.batch_size))
    micro_steps = max(micro_steps, cfg.min_steps * cfg.grad_accum)
    # Whole optimiser steps, the same number in every process (DDP needs every rank to step).
    nproc = accelerator.num_processes
    per_rank = max(1, math.ceil(micro_steps / nproc / cfg.grad_accum)) * cfg.grad_accum
    total_steps = per_rank // cfg.grad_accum
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr or cfg.lr, weight_decay=0.0)
    # Linear warm-up whose first step already moves (step s of w runs at (s+1)/(w+1) of the peak).
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / (cfg.warmup_steps + 1)))
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    model.train()

    batches = _batches(len(rows), cfg.batch_size, per_rank * nproc, seed)[accelerator.process_index :: nproc]
    losses, nlls, iws = [], [], []
    step_loss, step_nll, tokens, own_tokens = 0.0, 0.0, 0, 0
    for i, batch in enumerate(batches):
        picked = [rows[j] for j in batch]
        input_ids = _pad([r["ids"] for r in picked], tokenizer.pad_token_id).to(accelerator.device)
        mask = _pad([r["mask"] for r in picked], 0).to(accelerator.device)
        attention = _pad([[1] * len(r["ids"]) for r in picked], 0).to(accelerator.device)
        w = torch.tensor([r["weight"] for r in picked], device=accelerator.device)
        with accelerator.accumulate(model), accelerator.autocast():
            logits = model(input_ids=input_ids, attention_mask=attention).logits
            if iw:
                ref = torch.tensor([r["ref_logp"] for r in picked], device=accelerator.device)
                _, seq_logp = weighted_nll(logits, input_ids, mask, w)
                factor = iw_factor(seq_logp, ref, weights.iw_temperature, weights.w_max)  # type: ignore[union-attr]
                iws += factor.tolist()
                w = w * factor
            loss, seq_logp = weighted_nll(logits, input_ids, mask, w)
            accelerator.backward(loss)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
        own = mask[:, 1:].sum().item()
        step_loss += loss.item() / cfg.grad_accum
        step_nll += float(-(seq_logp * mask[:, 1:].sum(1)).sum().item() / max(own, 1)) / cfg.grad_accum
        tokens += int(attention.sum().item())
        own_tokens += int(own)
        if (i + 1) % cfg.grad_accum == 0:
            losses.append(step_loss)
            nlls.append(step_nll)
            if on_step:
                on_step(len(losses), total_steps, step_loss)
            step_loss, step_nll = 0.0, 0.0

    _save(accelerator, model, tokenizer, Path(out), cfg.lora)
    seconds = time.perf_counter() - start_time
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
        mean_iw=sum(iws) / len(iws) if iws else None,
        losses=losses,
    )


@torch.no_grad()
def _mean_logps(model, rows: list[dict], pad_id: int, batch_size: int, device) -> list[float]:
    """Mean log-prob of each example's own tokens under ``model`` as it is now (pi_ref)."""
    was_training = model.training
    model.eval()
    out: list[float] = []
    for i in range(0, len(rows), batch_size):
        picked = rows[i : i + batch_size]
        ids = _pad([r["ids"] for r in picked], pad_id).to(device)
        mask = _pad([r["mask"] for r in picked], 0).to(device)
        attention = _pad([[1] * len(r["ids"]) for r in picked], 0).to(device)
        logits = model(input_ids=ids, attention_mask=attention).logits
        _, seq_logp = weighted_nll(logits, ids, mask, torch.ones(len(picked), device=device))
        out += seq_logp.float().tolist()
    model.train(was_training)
    return out


def _save(accelerator, model, tokenizer, out: Path, lora: bool) -> None:
    """Write to ``out.partial`` and rename, so ``out`` exists only when complete."""
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    unwrapped = accelerator.unwrap_model(model)
    unwrapped.save_pretrained(partial)
    if not lora:
        tokenizer.save_pretrained(partial)
    shutil.rmtree(out, ignore_errors=True)
    partial.rename(out)


def save_stats(path: str | Path, stats: TrainStats) -> None:
    write_lines_atomic(path, [json.dumps(stats.to_dict())])
