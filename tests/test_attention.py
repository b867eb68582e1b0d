"""Attention over a shared prefix kept once (``hf_attention``) against transformers' SDPA
attention over the prefix joined to every row's keys, in float64."""

import pytest
import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from parlay.agents.hf_attention import SharedPrefix, attention


class Layer(torch.nn.Module):
    """What the attention function reads off an attention module."""

    def __init__(self, groups: int) -> None:
        super().__init__()
        self.num_key_value_groups, self.is_causal, self.layer_idx = groups, True, 0


def _case(queries: int, groups: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    batch, kv_heads, dim, prefix, own = 3, 2, 8, 5, 9

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    q = rand(batch, kv_heads * groups, queries, dim)
    pk, pv, k, v = (
        rand(kv_heads, prefix, dim),
        rand(kv_heads, prefix, dim),
        rand(batch, kv_heads, own, dim),
        rand(batch, kv_heads, own, dim),
    )
    return q, (pk, pv), k, v


def _reference(q, prefix, k, v, mask, groups):
    """SDPA over the prefix copied into every row, the prefix never masked."""
    (pk, pv), batch = prefix, q.shape[0]
    keys = torch.cat([pk.expand(batch, -1, -1, -1), k], 2)
    values = torch.cat([pv.expand(batch, -1, -1, -1), v], 2)
    if mask is not None:
        seen = torch.ones((*mask.shape[:3], pk.shape[1]), dtype=torch.bool)
        mask = torch.cat([seen, mask], -1)
    return sdpa_attention_forward(Layer(groups), q, keys, values, mask, scaling=0.3)[0]


@pytest.mark.parametrize("groups", [1, 3])
def test_a_decode_step_attends_over_the_prefix_and_each_rows_unmasked_keys(groups):
    q, prefix, k, v = _case(1, groups)
    mask = torch.ones((3, 1, 1, 9), dtype=torch.bool)
    mask[0, ..., :4] = False  # row 0 left-padded
    mask[2, ..., -2:] = False  # row 2 with unfilled room at the end
    got, weights = attention(Layer(groups), q, k, v, mask, shared_prefix=SharedPrefix([prefix]), scaling=0.3)
    assert weights is None
    torch.testing.assert_close(got, _reference(q, prefix, k, v, mask, groups), rtol=0, atol=1e-12)
    # No mask (transformers' sign that no filled column is masked): every column, when all are
    # filled; only the filled ones when the decoder says fewer are (its cache's room after them:
    # the first step of rows whose whole prompt but its last token is the shared prefix).
    for filled in (None, 9, 1, 4):
        seen = torch.arange(9) < (filled or 9)
        got = attention(Layer(groups), q, k, v, None, shared_prefix=SharedPrefix([prefix], filled=filled), scaling=0.3)
        expected = _reference(q, prefix, k, v, seen.expand(3, 1, 1, 9), groups)
        torch.testing.assert_close(got[0], expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("groups", [1, 3])
def test_a_prefill_is_causal_over_the_rows_keys_with_or_without_a_mask(groups):
    q, prefix, k, v = _case(4, groups, seed=1)
    # Given a mask: the 4 new tokens are the last of 9 columns, row 1 left-padded by 2.
    causal = torch.arange(9)[None, :] <= torch.arange(5, 9)[:, None]
    mask = causal.expand(3, 1, 4, 9).clone()
    mask[1, ..., :2] = False
    got = attention(Layer(groups), q, k, v, mask, shared_prefix=SharedPrefix([prefix]), scaling=0.3)[0]
    torch.testing.assert_close(got, _reference(q, prefix, k, v, mask, groups), rtol=0, atol=1e-12)
    # No mask: transformers' sign that SDPA's own causal mask is right. The 4 queries are the
    # first columns and the 5 after them unfilled room (filled=4), or the last of 9 filled ones.
    for filled, last in ((4, 3), (None, 8)):
        causal = (torch.arange(9)[None, :] <= torch.arange(last - 3, last + 1)[:, None]).expand(3, 1, 4, 9)
        shared = SharedPrefix([prefix], filled=filled)
        got = attention(Layer(groups), q, k, v, None, shared_prefix=shared, scaling=0.3)[0]
        torch.testing.assert_close(got, _reference(q, prefix, k, v, causal, groups), rtol=0, atol=1e-12)


def test_without_a_prefix_it_is_transformers_sdpa_attention():
    q, _, k, v = _case(4, 3, seed=2)
    got = attention(Layer(3), q, k, v, None, scaling=0.3)[0]
    assert torch.equal(got, sdpa_attention_forward(Layer(3), q, k, v, None, scaling=0.3)[0])


def test_each_layer_that_used_the_prefix_is_recorded():
    q, prefix, k, v = _case(1, 1)
    shared = SharedPrefix([prefix, prefix])
    layer = Layer(1)
    layer.layer_idx = 1
    attention(layer, q, k, v, None, shared_prefix=shared, scaling=0.3)
    assert shared.served == {1} and shared.length == 5
