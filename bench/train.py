"""Training throughput and memory of the quickstart's warm start, per way of cutting the work.

    .venv/bin/python bench/train.py [--steps 3] [--full] [--dtype float32]

The data is the warm start of ``configs/cpu-quickstart.yaml``, made with parlay's own functions
(128 games between two bot:conceder, the sides of valid deals: ~254 examples), trained as the
config trains it (LoRA r16 on every linear layer, batch 4 × accumulation 2). Each candidate runs
the same first ``--steps`` optimiser steps of the same plan in a fresh process (so its peak RSS is
its own) and is measured on its own against (a):

(a) before: full-vocabulary logits at every position, micro-batches in the shuffled order, every
    row run whole (the trainer up to commit 4508d09);
(b) (a) with the head and the loss only at the targets (``logits_to_keep`` with a boolean mask);
(c) (a) with the step's examples sorted by length into micro-batches (less padding);
(d) (a) with the head the rows of a micro-batch share (the system prompt's opening) run once;
(e) all three: what ``improve/sft.train`` did up to commit 6cd7761 (it now also cuts micro-batches to
    ``train.micro_batch_tokens`` and runs the step's shared head once per step: ``--full`` times it).

Per candidate: seconds per optimiser step split into forward (with head and loss), backward and
the optimiser (clipping included); positions computed (padding and shared heads counted as run);
training tokens/s (the examples' real tokens); the share of this machine's compute limit for a
training token; peak RSS. The limit: measured peak matmul FLOP/s in the dtype trained over the
FLOPs a LoRA step needs per real token when every row is run whole and the head only at targets — 4 × body
parameters (forward, and backward to the activations; frozen weights get no gradient) + 6 × LoRA
parameters + 4 × head parameters × (targets / tokens) + causal attention (3 × 4 × layers × width ×
mean context / 2). A shared head can beat it: it computes fewer than the examples' tokens.

glibc's ``MALLOC_MMAP_THRESHOLD_``, when set, reaches the children (and the report names it):
``MALLOC_MMAP_THRESHOLD_=1048576`` trades training time for a lower peak (bench/RESULTS.md).

``--full`` also runs the whole warm start through ``sft.train`` (what ``parlay train`` runs) and
reports its time, tokens/s and peak RSS. Figures are appended to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from rollout import commit_label, peak_matmul_flops  # bench/ is on the path when a bench script runs

from parlay.agents.machine import peak_rss_gb
from parlay.improve.sft import micro_batch_budget

RESULTS = Path(__file__).with_name("RESULTS.md")
ROOT = Path(__file__).resolve().parents[1]
CANDIDATES = {
    "a": ("(a) before: all logits, shuffled micro-batches, rows whole", dict(targets=False, sort=False, share=False)),
    "b": ("(b) head and loss at targets only", dict(targets=True, sort=False, share=False)),
    "c": ("(c) length-sorted micro-batches", dict(targets=False, sort=True, share=False)),
    "d": ("(d) shared head once per micro-batch", dict(targets=False, sort=False, share=True)),
    "e": ("(e) all three", dict(targets=True, sort=True, share=True)),
}


def warm_start_examples(config: Path):
    """The quickstart's warm-start examples, as ``Loop.warm_start`` makes them."""
    import yaml

    from parlay.agents import load_agent
    from parlay.config import WeightConfig, parse_config
    from parlay.games.dond import objective
    from parlay.improve.examples import select_examples
    from parlay.rollout import derive_seed, plan_games, play_games

    cfg = parse_config(yaml.safe_load(config.read_text()), str(config))
    ws = cfg.warm_start
    a, b = (load_agent(s) for s in ws.bots or [])
    games = plan_games(ws.games, derive_seed(cfg.seed, 7919))
    episodes = play_games(a, b, games, objective(cfg.objective), cfg.rollout.max_messages)
    return cfg, select_examples(episodes, ws.filter, WeightConfig()).examples


# --------------------------------------------------------------------------- one candidate (a child process)


def run_candidate(args, targets: bool, sort: bool, share: bool) -> dict:
    from parlay.agents import hf_layer
    from parlay.improve import batches, sft
    from parlay.improve.batches import collate
    from parlay.improve.examples import read_examples
    from parlay.improve.losses import shared_forward, weighted_nll

    cfg = _config(args)
    examples = read_examples(args.data)
    torch.manual_seed(0)
    dtype = _dtype(args.dtype)  # (before 2026-12-01 19:20 UTC the candidates ran in float32 whatever --dtype said)
    model, tokenizer = sft._load_for_training(args.model, None, cfg, dtype)
    stops = hf_layer.stop_ids(tokenizer, model.generation_config)
    rows, _, _ = batches.tokenize(examples, tokenizer, stops, cfg.max_length)
    micro = cfg.batch_size * cfg.grad_accum
    steps = batches.plan(rows, cfg.batch_size, cfg.grad_accum, args.steps * cfg.grad_accum, 1, 0, _gen(args))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)
    model.train()
    t = {"forward": 0.0, "backward": 0.0, "optimiser": 0.0}
    tokens = positions = targets_n = 0
    losses = []
    for s, step in enumerate(steps):
        chosen = [i for b in step.micro_batches for i in b]
        if not sort:  # the shuffled order the plan drew, before it sorted the step
            random.Random(s).shuffle(chosen)
        loss_sum = 0.0
        for j in range(0, micro, cfg.batch_size):
            picked = [rows[i] for i in chosen[j : j + cfg.batch_size]]
            batch = collate(picked, tokenizer.pad_token_id, "cpu", share)
            tokens += int(batch.attention.sum())
            positions += batch.ids.numel() - (len(picked) - 1) * batch.shared
            targets_n += len(batch.targets)
            start = time.perf_counter()
            with sft.mixed_precision(model, "cpu", dtype == torch.bfloat16):  # the trainer's dtypes
                if batch.shared:
                    keep = batch.keep if targets else torch.ones_like(batch.keep)
                    logits = shared_forward(model, batch.__class__(**{**vars(batch), "keep": keep}))
                else:
                    logits = model(
                        input_ids=batch.ids, attention_mask=batch.attention, logits_to_keep=batch.keep if targets else 0
                    ).logits
            if not targets:  # every position's logits → the targets' rows
                keep = batch.keep[:, batch.shared :]
                logits = logits.reshape(-1, logits.shape[-1])[keep.flatten()]
            logp = torch.log_softmax(logits.float(), -1).gather(-1, batch.targets[:, None])[:, 0]
            w = torch.tensor([r.weight for r in picked])
            loss = weighted_nll(logp, batch.row, w, step.own_tokens)[0]
            t["forward"] += time.perf_counter() - start
            start = time.perf_counter()
            loss.backward()
            t["backward"] += time.perf_counter() - start
            loss_sum += loss.item()
            del logits, logp, loss
        start = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad()
        t["optimiser"] += time.perf_counter() - start
        losses.append(loss_sum)
    seconds = sum(t.values())
    return {
        "seconds": seconds,
        "per_step": {k: v / len(steps) for k, v in t.items()},
        "tokens": tokens,
        "positions": positions,
        "targets": targets_n,
        "tok_s": tokens / seconds,
        "rss_gb": peak_rss_gb(),
        "losses": losses,
        "flops_per_token": _flops_per_token(model, rows),
        "steps": len(steps),
    }


def _flops_per_token(model, rows) -> float:
    """FLOPs a LoRA training step needs per real token, every row run whole, the head at targets only."""
    base = model.get_base_model()
    conf = base.config
    head = base.get_output_embeddings().weight.numel()
    lora = sum(p.numel() for p in model.parameters() if p.requires_grad)
    body = sum(p.numel() for n, p in base.named_parameters() if "lora_" not in n) - head
    if not conf.tie_word_embeddings:
        body -= base.get_input_embeddings().weight.numel()
    tokens = sum(len(r.ids) for r in rows)
    targets = sum(r.own for r in rows)
    mean_context = sum(len(r.ids) * (len(r.ids) + 1) / 2 for r in rows) / tokens
    width = conf.num_attention_heads * getattr(conf, "head_dim", conf.hidden_size // conf.num_attention_heads)
    attention = 3 * 4 * conf.num_hidden_layers * width * mean_context / 2
    return 4 * body + 6 * lora + 4 * head * targets / tokens + attention


def run_trainer(args) -> dict:
    """The whole warm start through ``sft.train``, as the loop calls it."""
    from parlay.agents import hf_layer
    from parlay.improve import batches, sft
    from parlay.improve.examples import read_examples
    from parlay.improve.sft import train

    cfg = _config(args)
    examples = read_examples(args.data)
    with tempfile.TemporaryDirectory() as tmp:
        stats = train(examples, args.model, Path(tmp) / "model", cfg, seed=args.seed, epochs=args.epochs, lr=args.lr)
    rss = peak_rss_gb()
    model, tokenizer = sft._load_for_training(args.model, None, cfg, torch.float32)  # for the FLOP count only
    rows, _, _ = batches.tokenize(
        examples, tokenizer, hf_layer.stop_ids(tokenizer, model.generation_config), cfg.max_length
    )
    return {
        "stats": stats.model_dump(exclude={"losses", "grad_norms"}),
        "rss_gb": rss,
        "flops_per_token": _flops_per_token(model, rows),
    }


def _config(args):
    from parlay.config import TrainConfig

    return TrainConfig.model_validate(json.loads(args.train)).model_copy(update={"dtype": args.dtype})


def _gen(args) -> torch.Generator:
    return torch.Generator().manual_seed(args.seed)


# --------------------------------------------------------------------------- the parent


def child(args, mode: str) -> dict:
    cmd = [sys.executable, __file__, "--child", mode, "--data", args.data, "--train", args.train]
    cmd += ["--steps", str(args.steps), "--dtype", args.dtype, "--model", args.model, "--seed", str(args.seed)]
    cmd += ["--epochs", str(args.epochs), "--lr", str(args.lr)]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "cpu-quickstart.yaml"))
    parser.add_argument("--steps", type=int, default=3, help="optimiser steps per candidate")
    parser.add_argument("--full", action="store_true", help="also the whole warm start through sft.train")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--only", default="abcde", help="candidates to run, e.g. 'ae' ('' with --full: none)")
    parser.add_argument(
        "--train-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a train setting of the config, e.g. micro_batch_tokens=null (repeatable)",
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--train", help=argparse.SUPPRESS)
    parser.add_argument("--model", default="smollm2-135m", help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--epochs", type=float, default=1.0, help=argparse.SUPPRESS)
    parser.add_argument("--lr", type=float, default=1e-3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        result = run_trainer(args) if args.child == "trainer" else run_candidate(args, **CANDIDATES[args.child][1])
        print(json.dumps(result))
        return

    from parlay.improve.examples import write_examples

    cfg, examples = warm_start_examples(Path(args.config))
    args.model, args.seed = cfg.model, cfg.seed
    args.epochs, args.lr = cfg.warm_start.epochs, cfg.warm_start.lr or cfg.train.lr
    import yaml

    overrides = {k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in args.train_set)}
    cfg = cfg.model_copy(update={"train": cfg.train.model_validate(cfg.train.model_dump() | overrides)})
    args.train = cfg.train.model_dump_json()
    load = Path("/proc/loadavg").read_text().split()[:3]
    with tempfile.TemporaryDirectory() as tmp:
        args.data = str(Path(tmp) / "warm.jsonl")
        write_examples(args.data, examples)
        peak = peak_matmul_flops(_dtype(args.dtype))
        results = {k: child(args, k) for k in args.only}
        full = child(args, "trainer") if args.full else None
    load_after = Path("/proc/loadavg").read_text().split()[:3]
    print(_report(args, cfg, examples, peak, results, full, load, load_after))


def _dtype(name: str) -> torch.dtype:
    """The dtype ``name`` trains in here (``auto``: what the trainer picks on this machine)."""
    from parlay.agents.hf_layer import pick_dtype

    return pick_dtype(name, "cpu")


def _report(args, cfg, examples, peak, results, full, load, load_after) -> str:
    first = next(iter(results.values()), None) or full
    limit = peak / first["flops_per_token"]
    lines = [
        "| candidate | s/step | forward | backward | optimiser | positions run / real tokens | tok/s "
        "| share of limit | vs (a) | peak RSS GB |",
        "|" + "---|" * 10,
    ]
    base = results.get("a")

    def ratio(r: dict) -> str:
        return f"{r['tok_s'] / base['tok_s']:.2f}×" if base else "—"

    for key, r in results.items():
        ps = r["per_step"]
        lines.append(
            f"| {CANDIDATES[key][0]} | {r['seconds'] / r['steps']:.1f} | {ps['forward']:.1f} | {ps['backward']:.1f} "
            f"| {ps['optimiser']:.2f} | {r['positions'] / r['tokens']:.2f} | {r['tok_s']:.0f} "
            f"| {r['tok_s'] / limit:.0%} | {ratio(r)} "
            f"| {r['rss_gb']:.2f} |"
        )
    same = [max(abs(x - y) for x, y in zip(r["losses"], base["losses"], strict=True)) for r in results.values() if base]
    cpu = _cpu_name()
    n = torch.get_num_threads()
    threads, dtype = f"{n} thread{'s' if n != 1 else ''}", str(_dtype(args.dtype)).removeprefix("torch.")
    tokens = first["tokens"] / first["steps"] if results else None
    cut = micro_batch_budget(cfg.train.micro_batch_tokens, _dtype(args.dtype))
    text = [
        f"\n## train — {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC, commit {commit_label()}",
        f"Machine: {cpu} ({platform.machine()}), {threads}, torch {torch.__version__}, "
        f"native bf16: {'yes' if _has_bf16() else 'no'}; dtype {args.dtype}; load average {' '.join(load)} before, "
        f"{' '.join(load_after)} after. Model {cfg.model}, LoRA r{cfg.train.lora_r}, batch {cfg.train.batch_size} × "
        f"accumulation {cfg.train.grad_accum}, micro-batches cut at {cut or 'no'} padded positions (sft.train "
        f"only); the quickstart's warm start: {len(examples)} examples; "
        + (
            f"each candidate the same first {first['steps']} steps ({tokens:.0f} real tokens a step); "
            if results
            else ""
        )
        + f"glibc's mmap threshold: {_malloc()}.",
        f"Compute limit: peak {dtype} matmul {peak / 1e9:.0f} GFLOP/s over {first['flops_per_token'] / 1e6:.0f} "
        f"MFLOP per training token = **{limit:.0f} tokens/s**.",
        "",
        *(lines if results else []),
        "",
        f"Largest loss difference of a step from (a): {max(same):.1e} (the same learning)." if same else "",
    ]
    if full:
        s = full["stats"]
        text.append(
            f"Whole warm start through sft.train: {s['steps']} steps, {s['seconds']:.0f} s, "
            f"{s['tokens_per_second']:.0f} tokens/s ({s['tokens_per_second'] / limit:.0%} of the limit), "
            f"peak RSS {full['rss_gb']:.2f} GB; "
            f"loss {s['loss_first']:.3f} → {s['loss_last']:.3f}."
        )
    report = "\n".join(text)
    with RESULTS.open("a", encoding="utf-8") as f:
        f.write(report + "\n")
    return report


def _malloc() -> str:
    """glibc's mmap threshold as the environment sets it."""
    value = os.environ.get("MALLOC_MMAP_THRESHOLD_")
    return f"MALLOC_MMAP_THRESHOLD_={value}" if value else "glibc's default"


def _cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def _has_bf16() -> bool:
    from parlay.agents.hf_layer import cpu_has_bf16

    return cpu_has_bf16()


if __name__ == "__main__":
    main()
