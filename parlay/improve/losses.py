"""The one log-prob helper and the losses of the trainer (``sft.py``).

``token_logps`` is the only place the model is run: training, iw-SFT's π_ref, online RL's π_old
and the sampler–trainer parity all take their log-probs from it. It computes the language-model
head only at the targets (transformers' ``logits_to_keep`` with a boolean mask: the head's work
and its full-vocabulary float32 logits at every other position are never made; the model applies
its own final-logit soft-capping, Gemma-style), and the head the rows share once for all of them:
once per optimiser step in training (``StepHead``), once per micro-batch elsewhere
(``shared_forward``).

Every loss works on the flat list of a micro-batch's N targets (``Batch.row`` says whose) and is
a *share* of its optimiser step's loss: summed over the micro-batch's own tokens and divided by the
step's own-token count (``own_tokens``), so the shares of all micro-batches and processes add up
to the loss of one big batch. ``micro_batch_loss`` is where the operators differ.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from parlay.config import WeightConfig
from parlay.improve.batches import Batch, Row
from parlay.improve.weights import iw_factor

Reweight = Callable[[torch.Tensor], torch.Tensor]
"""Per-sequence mean log-prob [B] → a factor [B] that multiplies the examples' weights."""


def token_logps(
    model, batch: Batch, entropy: bool = False, head: StepHead | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(log π of each target's own token [N], with ``entropy`` the entropy of π there [N], detached).
    ``head``: the step's shared head, already run (``StepHead``; ``batch.shared`` is its length)."""
    if head is not None:
        logits = head.rest(model, batch)
    elif batch.shared:
        logits = shared_forward(model, batch)
    else:
        logits = model(input_ids=batch.ids, attention_mask=batch.attention, logits_to_keep=batch.keep).logits
    # logits [N, V]: the head at the targets only
    logp_all = torch.log_softmax(logits.float(), dim=-1)  # [N, V]
    logp = logp_all.gather(-1, batch.targets[:, None])[:, 0]  # [N]
    ent = -(logp_all.exp() * logp_all).sum(-1).detach() if entropy else None  # [N]
    return logp, ent


def shared_forward(model, batch: Batch) -> torch.Tensor:
    """The target logits [N, V], the head of ``batch.shared`` tokens that every row begins with run
    once (batch 1) and its keys and values repeated for the rows' own parts. Gradients flow through
    the repeat, so the shared head gets the sum of every row's gradient, as B copies of it would."""
    return StepHead.run(model, batch.ids[:1, : batch.shared], detached=False).rest(model, batch)


def weighted_nll(
    logp: torch.Tensor,
    row: torch.Tensor,
    weights: torch.Tensor,
    own_tokens: int | torch.Tensor | None = None,
    reweight: Reweight | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Weighted token-level NLL of the player's own tokens.

    logp [N]: log π of each own token; row [N]: its sequence; weights [B]. ``own_tokens``: what the
    summed loss is divided by (default N; in training, the own tokens of the whole optimiser step).
    Returns (loss: scalar, seq_logp [B]: each sequence's mean own-token log-prob, factor [B]:
    ``reweight(seq_logp)`` that multiplied the weights, ones without ``reweight``)."""
    seq_logp = _per_sequence_mean(logp, row, len(weights))  # [B]
    factor = reweight(seq_logp) if reweight is not None else torch.ones_like(seq_logp)  # iw-SFT's, else 1
    loss = -((weights * factor)[row] * logp).sum() / (own_tokens or len(logp))
    return loss, seq_logp, factor


class StepHead:
    """The head every row of an optimiser step shares, run once for the whole step (batch 1, its
    graph kept) instead of once per micro-batch. Each micro-batch reads the head's keys and values
    as leaves of its own (``rest``), so its backward pass stops there and leaves their gradients
    summed (in float32, whatever the compute dtype); ``backward``, after the step's last
    micro-batch, sends the sums through the head once. The gradient is the one B copies of the
    head in every micro-batch give (``shared_forward``), and the step's cost no longer grows with
    its number of micro-batches. For models whose cache is plain per-layer keys and values
    (``sft._can_share_heads`` checks). Not ``detached``: the micro-batch reads the head's own keys
    and values, its gradient flows into the head directly, and ``backward`` has nothing to do (one
    micro-batch's head: ``shared_forward``)."""

    def __init__(self, kv: list[tuple[torch.Tensor, torch.Tensor]], detached: bool) -> None:
        self.kv, self.detached = kv, detached
        self.leaves = [
            tuple(t.detach().float().requires_grad_(t.requires_grad) if detached else t for t in pair) for pair in kv
        ]

    @classmethod
    def run(cls, model, ids: torch.Tensor, detached: bool = True) -> StepHead:
        """The head ``ids`` [1, P] run through ``model``."""
        from transformers import DynamicCache

        cache = DynamicCache(config=model.config)
        model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=torch.zeros_like(ids, dtype=torch.bool))
        return cls([(layer.keys, layer.values) for layer in cache.layers], detached)

    @property
    def length(self) -> int:
        """P: the head's tokens (its keys are [1, heads, P, head_dim])."""
        return self.kv[0][0].shape[-2]

    def rest(self, model, batch: Batch) -> torch.Tensor:
        """The target logits [N, V] of ``batch``, whose first ``batch.shared`` tokens are the head."""
        from transformers import DynamicCache

        if batch.shared != self.length:
            raise ValueError(f"a micro-batch with a shared head of {batch.shared} tokens, the step's is {self.length}")
        cache = DynamicCache(config=model.config)
        for i, ((k, v), (leaf_k, leaf_v)) in enumerate(zip(self.kv, self.leaves, strict=True)):
            cache.update(leaf_k.to(k.dtype), leaf_v.to(v.dtype), i)
        cache.batch_repeat_interleave(batch.ids.shape[0])
        p = batch.shared
        out = model(
            input_ids=batch.ids[:, p:], attention_mask=batch.attention, cache=cache, logits_to_keep=batch.keep[:, p:]
        )
        return out.logits

    def backward(self) -> None:
        """The head's share of the step's gradient, from what the micro-batches left on its leaves."""
        if not self.detached:
            return
        pairs = [
            (t, leaf.grad.to(t.dtype))
            for kv, leaves in zip(self.kv, self.leaves, strict=True)
            for t, leaf in zip(kv, leaves, strict=True)
            if leaf.grad is not None
        ]
        if pairs:
            torch.autograd.backward([t for t, _ in pairs], [g for _, g in pairs])


@dataclass
class RLFigures:
    """Online RL's vital signs of a micro-batch, summed over its own tokens (divide by the step's)."""

    approx_kl: float
    """k3 estimate of KL(π_old ‖ π): Σ (r − 1 − log r), r = π/π_old."""
    clipped: float
    """Own tokens whose ratio is outside [1 − ε, 1 + ε]."""
    entropy: float
    """Σ of π's entropy at the own tokens' positions."""


def policy_gradient_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    row: torch.Tensor,
    advantages: torch.Tensor,
    clip: float,
    kl: float,
    own_tokens: int | torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, RLFigures]:
    """Online RL's loss over the player's own tokens (``weights.scheme: rl``).

    Per own token t of a sequence with advantage A: the ratio r = π(t)/π_old(t) to the round-start
    model (which played the games), the clipped surrogate −min(r·A, clip(r, 1±ε)·A), and a KL anchor
    to the same model, kl · (π_old/π − log(π_old/π) − 1) (non-negative, zero when π = π_old). Summed
    over own tokens and divided by ``own_tokens`` (as in ``weighted_nll``). logp, old_logp, row [N];
    advantages [B]. Returns (loss, each sequence's mean own-token log-prob [B], the figures without
    the entropy, which ``micro_batch_loss`` adds)."""
    delta = logp - old_logp  # [N] log r
    ratio = torch.exp(delta)
    a = advantages[row]  # [N]
    surrogate = -torch.minimum(ratio * a, ratio.clamp(1 - clip, 1 + clip) * a)
    anchor = torch.exp(-delta) + delta - 1  # the k3 estimator of KL(π ‖ π_old) at sampled tokens
    loss = (surrogate + kl * anchor).sum() / (own_tokens or len(logp))
    with torch.no_grad():
        figures = RLFigures(
            approx_kl=(torch.expm1(delta) - delta).sum().item(),
            clipped=((ratio - 1).abs() > clip).sum().item(),
            entropy=0.0,
        )
    return loss, _per_sequence_mean(logp, row, len(advantages)), figures


def _per_sequence_mean(logp: torch.Tensor, row: torch.Tensor, b: int) -> torch.Tensor:
    own = torch.bincount(row, minlength=b).clamp(min=1)  # [B]
    return torch.zeros(b, dtype=logp.dtype, device=logp.device).index_add(0, row, logp) / own


def micro_batch_loss(
    model,
    batch: Batch,
    picked: list[Row],
    weights: WeightConfig | None,
    step_tokens: int,
    head: StepHead | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, RLFigures | None]:
    """A micro-batch's share of its optimiser step's loss, the one place where the operators
    differ: online RL's clipped policy gradient on the advantages, or the weighted NLL (iw-SFT: each
    weight times its factor against π_ref). Returns (loss, each sequence's mean own-token log-prob
    [B], the factor [B] that multiplied the weights, RL's figures or None)."""
    device = batch.ids.device
    rl = weights is not None and weights.scheme == "rl"
    logp, entropy = token_logps(model, batch, entropy=rl, head=head)  # [N]
    w = torch.tensor([r.weight for r in picked], device=device)  # [B]
    if rl:
        old = torch.tensor([lp for r in picked for lp in r.old_logps or []], device=device)  # [N]
        loss, seq_logp, figures = policy_gradient_loss(
            logp, old, batch.row, w, weights.rl.clip, weights.rl.kl, step_tokens
        )
        figures.entropy = entropy.sum().item()  # type: ignore[union-attr]
        return loss, seq_logp, torch.ones_like(seq_logp), figures
    reweight = None
    if weights is not None and weights.scheme == "iw_sft":
        ref = torch.tensor([r.ref_logp for r in picked], device=device)
        reweight = lambda lp: iw_factor(lp, ref, weights.iw_temperature, weights.w_max)  # noqa: E731
    return (*weighted_nll(logp, batch.row, w, step_tokens, reweight), None)
