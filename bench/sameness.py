"""Behaviour sameness across a refactor: the same seeded commands on two source trees, compared.

    # once per tree (a worktree of the old commit, then the new one), each into its own folder:
    PYTHONPATH=/tmp/house-base .venv/bin/python bench/sameness.py run /tmp/same/base
    PYTHONPATH=/work/main      .venv/bin/python bench/sameness.py run /tmp/same/after
    .venv/bin/python bench/sameness.py compare /tmp/same/base /tmp/same/after

``run`` plays, in ``OUT`` (every path relative to it, so records compare as text):

- (a) ``parlay play --a bot:hard --b bot:cooperative -n 50 --seed 1`` (bot games);
- (b) ``parlay train`` on the tests' tiny parrot model (``tests/conftest.py``'s ``parrot_lm``,
  built once and shared by both runs in ``OUT/../parrot``): a shortened ``cpu-quickstart`` — a
  warm start on 8 bot games, round 0, then round 1 trained on all of round 0's sides (``filter: all``: the parrot makes
  no deals) with self, a bot and ``checkpoint:latest`` as partners, 4 held-out games
  with each of two bots, 16 new tokens a reply;
- (c) ``parlay eval --agents bot:hard,bot:conceder,run:runs/quick@all`` (a tournament of bots and
  the run's two round models) and ``parlay eval --lambdas`` (a λ sweep of two bots).

``compare`` checks every file of the two folders: JSONL and ``train.jsonl`` byte for byte,
safetensors weights tensor for tensor (``torch.equal``), JSON records equal but for wall-clock
figures (``minutes``, ``seconds``, ``tokens_per_second``), images and logs skipped. It prints
each difference and exits 1 if there is one. About 2 minutes of CPU per ``run``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

CLOCK_KEYS = {"minutes", "seconds", "tokens_per_second"}
SKIP_SUFFIXES = {".png", ".html", ".log", ".lock", ".csv"}

QUICK = """\
name: quick
runs_dir: runs
model: {model}
objective: cooperative
seed: 0
rounds: 1
rollout: {{games: 8, max_messages: 6, temperature: 0.5, max_new_tokens: 16, contexts: same, batch: 16}}
partners:
  - {{agent: self, share: 0.5}}
  - {{agent: "bot:conceder", share: 0.25}}
  - {{agent: "checkpoint:latest", share: 0.25}}
heldout: {{partners: ["bot:hard", "bot:cooperative"], games: 4}}
filter: {{rule: all}}
train: {{lora_r: 4, lora_alpha: 8, lr: 5.0e-4, epochs: 1, min_steps: 2, batch_size: 4, grad_accum: 1, max_length: 512}}
warm_start: {{bots: [bot:conceder, bot:conceder], games: 8, epochs: 1, lr: 1.0e-3}}
"""


def tiny_model(root: Path) -> Path:
    """The tests' parrot model (``tests/conftest.py``: a tiny random Llama fully fine-tuned to
    answer every turn with one valid message, so games have accepted turns to train on), saved
    once under ``root`` (both runs load the same files)."""
    where = root / "parrot"
    if (where / "config.json").exists():
        return where
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from parlay import prompts
    from parlay.config import TrainConfig
    from parlay.games import all_contexts, objective
    from parlay.improve.examples import TrainExample
    from parlay.improve.sft import train
    from tests.conftest import tiny_model as build
    from tests.conftest import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    build(len(tokenizer)).save_pretrained(root / "tiny-lm")
    tokenizer.save_pretrained(root / "tiny-lm")
    reply = "[message] I want the books and you take the hats."
    examples = [
        TrainExample(
            messages=[
                {"role": "system", "content": prompts.system_prompt(ctx, player, objective(lam), 6)},
                {"role": "user", "content": "The negotiation starts now."},
                {"role": "assistant", "content": reply},
            ]
        )
        for ctx in all_contexts()[::700]
        for player in "AB"
        for lam in (0, 1)
    ]
    config = TrainConfig(lora=False, lr=1e-2, epochs=10, batch_size=8, grad_accum=1)
    train(examples, str(root / "tiny-lm"), where, config)
    tokenizer.save_pretrained(where)
    return where


def parlay(out: Path, *args: str) -> None:
    env = os.environ | {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "parlay", *args]
    with (out / "commands.log").open("a") as log:
        log.write(" ".join(command) + "\n")
        done = subprocess.run(command, cwd=out, env=env, stdout=log, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(args)}: exit status {done.returncode} (see {out}/commands.log)")


def run(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=False)
    model = tiny_model(out.parent)
    where = subprocess.check_output([sys.executable, "-c", "import parlay; print(parlay.__file__)"], cwd=out)
    print("parlay from", where.decode().strip())
    parlay(out, "play", "--a", "bot:hard", "--b", "bot:cooperative", "-n", "50", "--seed", "1", "-o", "play.jsonl")
    (out / "quick.yaml").write_text(QUICK.format(model=model))
    parlay(out, "train", "--config", "quick.yaml")
    agents = "bot:hard,bot:conceder,run:runs/quick@all"
    parlay(out, "eval", "--agents", agents, "-n", "4", "--seed", "2", "--out", "tournament", "--max-new-tokens", "16")
    parlay(out, "eval", "--agents", "bot:hard,bot:conceder", "--lambdas", "1,0,-1", "-n", "8", "--out", "sweep")


def _without_clock(data: Any) -> Any:
    """``data`` without wall-clock figures; peft's ``target_modules`` (a set, saved in hash order) sorted."""
    if isinstance(data, dict):
        out = {k: _without_clock(v) for k, v in data.items() if k not in CLOCK_KEYS}
        return out | ({"target_modules": sorted(out["target_modules"])} if "target_modules" in out else {})
    if isinstance(data, list):
        return [_without_clock(v) for v in data]
    return data


def _same_tensors(a: Path, b: Path) -> str | None:
    import torch
    from safetensors.torch import load_file

    ta, tb = load_file(a), load_file(b)
    if ta.keys() != tb.keys():
        return "different tensor names"
    bad = [k for k in ta if ta[k].dtype != tb[k].dtype or not torch.equal(ta[k], tb[k])]
    return f"{len(bad)} of {len(ta)} tensors differ (first: {bad[0]})" if bad else None


def _records(path: Path) -> list[Any]:
    text = path.read_text()
    lines = [text] if path.suffix == ".json" else [line for line in text.splitlines() if line.strip()]
    return [_without_clock(json.loads(line)) for line in lines]


def compare(a: Path, b: Path) -> int:
    files_a = {p.relative_to(a) for p in a.rglob("*") if p.is_file() and p.suffix not in SKIP_SUFFIXES}
    files_b = {p.relative_to(b) for p in b.rglob("*") if p.is_file() and p.suffix not in SKIP_SUFFIXES}
    problems = [f"only in {a}: {p}" for p in sorted(files_a - files_b)]
    problems += [f"only in {b}: {p}" for p in sorted(files_b - files_a)]
    counts = {"bytes": 0, "tensors": 0, "records": 0}
    for rel in sorted(files_a & files_b):
        pa, pb = a / rel, b / rel
        if pa.suffix == ".safetensors":
            why, kind = _same_tensors(pa, pb), "tensors"
        elif pa.suffix == ".json" or pa.name == "metrics.jsonl":
            why, kind = (None if _records(pa) == _records(pb) else "records differ"), "records"
        else:
            why, kind = (None if pa.read_bytes() == pb.read_bytes() else "bytes differ"), "bytes"
        counts[kind] += 1
        if why:
            problems.append(f"{rel}: {why}")
    for line in problems:
        print("DIFFERENT", line)
    n_episodes = sum(1 for p in files_a & files_b if p.suffix == ".jsonl" for _ in (a / p).open())
    print(f"compared {len(files_a & files_b)} files ({counts}); {n_episodes} JSONL lines; {len(problems)} differences")
    return 1 if problems else 0


if __name__ == "__main__":
    what, *paths = sys.argv[1:]
    if what == "run":
        run(Path(paths[0]).resolve())
    elif what == "compare":
        sys.exit(compare(Path(paths[0]), Path(paths[1])))
    else:
        raise SystemExit(__doc__)
