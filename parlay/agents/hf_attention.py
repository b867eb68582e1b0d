"""Attention over a prefix that every row of a batch shares, kept once (cascade attention).

In a round, every conversation opens with the same system prompt head (``prompts.system_prompt``
up to the game's own facts). The decoder keeps that head's keys and values once
(``SharedPrefix``) and each row's cache holds only what follows it; this attention joins the two.
A decode step (one query per row) scores all rows' queries against the shared keys in one matrix
product per key/value head, each row's query against its own keys in a batched product, and takes
one softmax over both, so the shared keys are read once a step rather than once per row and no row
holds a copy of them. A prefill (several queries per row) is rarer and compute-bound: it joins the
shared keys to each row's for the duration of one layer and calls transformers' SDPA attention.
The idea is that of Hydragen (Juravsky et al. 2024) and of cascade inference in FlashInfer (Ye et
al. 2024); this is a plain-PyTorch form of it for CPUs (measured in bench/RESULTS.md).

Exact up to rounding: every query's position follows all of the prefix's, so no query is masked
from a prefix key, and the rows' own masks (padding, causality, the decoder's unfilled room)
apply to their own keys as transformers builds them. A model is switched to this attention
(``enable``) only where it uses transformers' SDPA attention; with no prefix passed, the function
is transformers' SDPA attention itself, so training and every other call are unchanged.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch

NAME = "parlay_shared_prefix"
"""The name this attention is registered under in transformers' ``AttentionInterface``."""


@dataclass
class SharedPrefix:
    """The keys and values of a token prefix that every row of a batch begins with: per layer
    (keys, values), each [kv_heads, length, head_dim], already rotated to positions 0..length-1.
    ``served`` records the layers that attended over it in the current forward pass (the
    decoder checks that every layer did)."""

    layers: list[tuple[torch.Tensor, torch.Tensor]]
    served: set[int] = field(default_factory=set)
    filled: int | None = None
    """How many of the rows' own key columns hold keys in this forward pass, its new ones
    included: the decoder's in-place cache has unfilled room after them. None: all of them."""

    @property
    def length(self) -> int:
        return self.layers[0][0].shape[1]


@functools.cache
def register() -> str:
    """Register the attention and its mask (transformers' SDPA mask: a boolean [batch, 1, queries,
    keys] over each row's own keys, or None where SDPA's own causal flag would serve, which
    ``attention`` resolves with ``SharedPrefix.filled``) once per process; returns ``NAME``."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    return NAME


def enable(model) -> bool:
    """Switch ``model`` to this attention when it runs transformers' SDPA attention (every family
    that supports SDPA routes attention through the interface); returns whether it did. Models on
    eager attention (Gemma 2's soft-capping) or a kernel keep theirs, and the decoder gives their
    rows copies of the prefix instead."""
    current = getattr(model.config, "_attn_implementation", None)
    if current != "sdpa":
        return current == NAME  # already switched (another agent on the same model)
    model.set_attn_implementation(register())
    return model.config._attn_implementation == NAME


def attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    shared_prefix: SharedPrefix | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: ``query`` [batch, heads, queries, head_dim],
    ``key``/``value`` [batch, kv_heads, keys, head_dim] (each row's own keys, after the prefix),
    ``attention_mask`` boolean [batch, 1, queries, keys] or None; returns the output [batch,
    queries, heads, head_dim] and no weights. ``shared_prefix`` (a keyword the decoder passes to
    the model's forward, which hands it down to every layer): keys every row attends to before
    its own; None: transformers' SDPA attention, unchanged."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if shared_prefix is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    shared_prefix.served.add(module.layer_idx)
    prefix_k, prefix_v = shared_prefix.layers[module.layer_idx]
    batch, _, queries, _ = query.shape
    own = key.shape[2]
    if attention_mask is None:
        # transformers leaves the mask out where SDPA's own causal flag would be right: no padding
        # among the filled columns, none filled before the queries, or all filled. Either way the
        # queries are the last filled columns, causal, and the unfilled room after them is masked.
        filled = own if shared_prefix.filled is None else shared_prefix.filled
        cols = torch.arange(own, device=query.device)
        rows = torch.arange(filled - queries, filled, device=query.device)
        attention_mask = (cols[None, :] <= rows[:, None]).expand(batch, 1, queries, own)
    plain = all(kwargs.get(k) is None for k in ("softcap", "s_aux", "sinks", "position_bias"))
    if queries == 1 and plain and attention_mask.dtype == torch.bool:
        return _decode_step(query, key, value, attention_mask, prefix_k, prefix_v, kwargs.get("scaling")), None
    # A prefill: the prefix joined to each row's keys for this layer only, then SDPA.
    seen = torch.ones((batch, 1, queries, prefix_k.shape[1]), dtype=torch.bool, device=query.device)
    if attention_mask.dtype != torch.bool:
        seen = torch.zeros_like(seen, dtype=attention_mask.dtype)
    mask = torch.cat([seen, attention_mask.expand(batch, 1, queries, own)], dim=-1)
    key = torch.cat([prefix_k.expand(batch, -1, -1, -1), key], dim=2)
    value = torch.cat([prefix_v.expand(batch, -1, -1, -1), value], dim=2)
    return sdpa_attention_forward(module, query, key, value, mask, **kwargs)


def _decode_step(query, key, value, mask, prefix_k, prefix_v, scaling) -> torch.Tensor:
    """One query per row: [batch, heads, 1, d] → [batch, 1, heads, d]. The query heads that share
    a key/value head are grouped (GQA), the scores against the prefix come from one product per
    key/value head over all rows, and one softmax (float32 at least) spans prefix and own keys."""
    batch, heads, _, dim = query.shape
    kv_heads, length, _ = prefix_k.shape
    own = key.shape[2]
    groups = heads // kv_heads
    scaling = dim**-0.5 if scaling is None else scaling
    q = query.view(batch, kv_heads, groups, dim)
    accumulate = torch.promote_types(query.dtype, torch.float32)  # float32 for bf16, float64 stays
    scores = torch.empty((batch, kv_heads, groups, length + own), dtype=accumulate, device=query.device)
    by_head = q.transpose(0, 1).reshape(kv_heads, batch * groups, dim)  # all rows' queries, per kv head
    scores[..., :length] = (by_head @ prefix_k.transpose(1, 2)).view(kv_heads, batch, groups, length).transpose(0, 1)
    scores[..., length:] = q @ key.transpose(2, 3)
    scores.mul_(scaling)
    scores[..., length:].masked_fill_(~mask.reshape(batch, 1, 1, own), float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(value.dtype)
    out = probs[..., length:] @ value  # [batch, kv_heads, groups, d]
    shared = probs[..., :length].transpose(0, 1).reshape(kv_heads, batch * groups, length) @ prefix_v
    out += shared.view(kv_heads, batch, groups, dim).transpose(0, 1)
    return out.reshape(batch, heads, 1, dim).transpose(1, 2)
