"""How much each kept player-episode counts in the loss.

- ``uniform``: 1.
- ``awr`` (advantage-weighted, as in DigiRL): ``min(exp((R - b) / beta), w_max)``, with b the
  round or per-context mean reward (the same baseline the filter used).
- ``iw_sft`` (importance-weighted SFT): ``clip(exp(T * mean_t[log pi_theta(a_t) - log pi_ref(a_t)]),
  0, w_max)`` with pi_ref the model at the start of the round's training, frozen; the trainer
  recomputes it at every step as theta moves (``iw_factor``), so here every example starts at 1.
- ``judge``: an agent's 0-10 rating (``improve/judge.py``), divided by 10.
- ``rl``: the advantage ``R - b`` itself, negative for sides that did worse than their baseline
  (``rl_advantages``); the trainer turns it into a clipped policy-gradient loss (``sft.py``).

Static weights are scaled to mean 1 over the kept examples, so the learning rate means the same
under every scheme; advantages are scaled by their standard deviation instead (``rl.scale``).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence

import torch

from parlay.config import RLConfig, WeightConfig
from parlay.episode import PlayerEpisode


def awr_weights(rewards: Sequence[float], baselines: Sequence[float], beta: float, w_max: float) -> list[float]:
    return [min(math.exp((r - b) / beta), w_max) for r, b in zip(rewards, baselines, strict=True)]


def normalise(weights: Sequence[float]) -> list[float]:
    """Scale to mean 1 (all-zero weights stay zero)."""
    total = sum(weights)
    if total <= 0:
        return [0.0 for _ in weights]
    return [w * len(weights) / total for w in weights]


def static_weights(
    cfg: WeightConfig,
    rewards: Sequence[float],
    baselines: Sequence[float],
    ratings: Sequence[float | None] | None = None,
) -> list[float]:
    """The weight of each kept example before training starts (see the module docstring)."""
    if cfg.scheme in ("uniform", "iw_sft"):
        return [1.0] * len(rewards)
    if cfg.scheme == "awr":
        return normalise(awr_weights(rewards, baselines, cfg.beta, cfg.w_max))
    if cfg.scheme == "judge":
        if ratings is None:
            raise ValueError("judge weights need the judge's ratings")
        if cfg.judge.mode == "filter":
            return [1.0] * len(rewards)
        return normalise([(r or 0.0) / 10 for r in ratings])
    raise ValueError(f"unknown weight scheme {cfg.scheme!r}")


def iw_factor(logp: torch.Tensor, ref_logp: torch.Tensor, temperature: float, w_max: float) -> torch.Tensor:
    """iw-SFT's per-sequence weight from mean per-token log-probs under theta and pi_ref, [B] → [B].

    Detached: the weight scales the gradient of the NLL, it is not itself differentiated."""
    return torch.exp(temperature * (logp.detach() - ref_logp)).clamp(0.0, w_max)


def rl_advantages(sides: Sequence[PlayerEpisode], cfg: RLConfig) -> list[float]:
    """Each side's reward minus its baseline: the mean reward of the *other* sides of the same
    role (first or second speaker) — on the same context (``group``) or in the whole round
    (``role``). A side with no other in its group has no baseline and gets 0 (nothing to learn).
    With ``scale: std`` the advantages are divided by their standard deviation."""
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i, side in enumerate(sides):
        key = (side.first, side.context_key) if cfg.baseline == "group" else (side.first,)
        groups[key].append(i)
    out = [0.0] * len(sides)
    for members in groups.values():
        total = sum(sides[i].reward for i in members)
        for i in members:
            if len(members) > 1:
                out[i] = sides[i].reward - (total - sides[i].reward) / (len(members) - 1)
    if cfg.scale == "std" and len(out) > 1:
        mean = sum(out) / len(out)
        std = math.sqrt(sum((a - mean) ** 2 for a in out) / len(out))
        if std > 0:
            out = [a / std for a in out]
    return out
