"""The token-level decoding engine under the transformers agent (``hf.HFAgent``).

``DecodeEngine.decode`` takes a batch of prompts as token ids, each with the keys and values of
its first tokens when the caller has them (``past``), prefills the rest and samples one reply
per row; it knows nothing of games or conversations (the agent's cache policy decides what to
reuse). Rows of different lengths share one batch: cached keys/values are right-aligned in a
common width (left padding), new tokens are left-padded too, and the attention mask and
explicit position ids keep every row's positions right. Keys and values are written in place
into room reserved for the reply (``RoomyLayer``). Rows whose reply has ended leave the batch in
bulk, once they are a quarter of it (each removal copies the cache).

A batch whose rows all begin with the same cached prefix (the system prompt's head) can keep
that prefix once: ``decode(..., prefix=...)`` takes its keys and values apart from the rows' own,
which then hold only what follows it, and attends over it with ``hf_attention`` (cascade
attention); a model that cannot (not on SDPA attention) gets the prefix copied into each row, as
the rows' own keys, with the same results up to rounding.

Sliding-window models (Mistral, Gemma 2/3, Phi-3, Qwen2 with sliding layers): every layer keeps
all its keys and values here and transformers' own mask applies the window, which it measures
in cache columns. That is exact when each row's columns are its positions (no ``past``: left
padding only) or when a batch's columns all fit in the window; ``fits_window`` says which.

Tested against transformers' own ``generate`` (tests/test_hf.py, tests/test_families.py), with
transformers 5.24 (the bounds in pyproject.toml: ``RoomyLayer`` builds on ``DynamicLayer``).
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import torch

from parlay.agents import hf_attention
from parlay.agents.base import AgentError, Sampling

log = logging.getLogger(__name__)

KV = list[tuple[torch.Tensor, torch.Tensor]]
"""Per layer (keys, values), each [heads, tokens, head_dim] for one conversation."""

ATTENTION_KINDS = {"full_attention", "sliding_attention"}


def sliding_window(config, name: str = "model") -> int | None:
    """The shortest sliding attention window among a model's layers, or None when every layer
    attends to the whole sequence. Reads ``layer_types`` (transformers' per-layer attention kinds:
    Gemma 2/3, Qwen2 with sliding layers, recent configs) or, without it, ``sliding_window``
    (Mistral, Phi-3: every layer slides). Raises ``AgentError`` for an attention kind this decoder
    does not know (chunked or linear attention, state-space layers), before any game is played."""
    text_config = config.get_text_config()
    window = getattr(text_config, "sliding_window", None)
    kinds = getattr(text_config, "layer_types", None)
    if kinds is not None:
        unknown = sorted(set(kinds) - ATTENTION_KINDS)
        if unknown:
            raise AgentError(
                f"{name}: layers of kind {', '.join(unknown)} are not supported by the transformers decoder "
                "(it knows full and sliding attention); play this model through an openai: endpoint or vllm: instead"
            )
        return window if "sliding_attention" in kinds and window else None
    return window or None


@functools.cache
def _roomy_layer_class():
    """The class, built once: transformers is imported only when a model is."""
    from transformers.cache_utils import DynamicLayer

    class RoomyLayer(DynamicLayer):
        """One layer's keys and values for a batch, with room for the new tokens and the whole
        reply, written in place. Like transformers' ``StaticLayer``, attention reads the whole
        buffer (contiguous: a slice of it would be copied by every matrix product that reads it)
        and the mask covers it, its unfilled columns masked. (``DynamicLayer`` concatenates,
        copying the whole cache at every step of every layer.)"""

        def __init__(self, room: int) -> None:
            super().__init__()
            self.room, self.length = room, 0

        def reserve(self, batch: int, heads: int, length: int, dim: int, dtype, device) -> None:
            """Zeroed room for ``length`` cached positions plus the room; the caller fills the first."""
            self._k = torch.zeros((batch, heads, length + self.room, dim), dtype=dtype, device=device)
            self._v = torch.zeros_like(self._k)
            self.dtype, self.device, self.is_initialized = dtype, device, True
            self._set_length(length)

        def _set_length(self, length: int) -> None:
            self.length = length
            self.keys, self.values = self._k[:, :, :length], self._v[:, :, :length]

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
            if not self.is_initialized:
                batch, heads, _, dim = key_states.shape
                self.reserve(batch, heads, 0, dim, key_states.dtype, key_states.device)
            end = self.length + key_states.shape[-2]
            if end > self._k.shape[-2]:
                raise AgentError(f"decoder: {end} cache positions needed, {self._k.shape[-2]} reserved")
            self._k[:, :, self.length : end] = key_states
            self._v[:, :, self.length : end] = value_states
            self._set_length(end)
            return self._k, self._v

        def get_seq_length(self) -> int:
            return self.length

        def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
            """The whole buffer's width (its size once reserved), from column 0."""
            return (self._k.shape[-2] if self.is_initialized else self.room), 0

        def batch_select_indices(self, indices: torch.Tensor) -> None:
            if self.is_initialized:
                self._k, self._v = self._k[indices], self._v[indices]
                self._set_length(self.length)

    return RoomyLayer


def join_kv(head: KV, tail: KV | None) -> KV:
    """Keys and values of ``head``'s tokens followed by ``tail``'s, per layer (None: ``head`` alone)."""
    if tail is None:
        return head
    return [(torch.cat([hk, k], 1), torch.cat([hv, v], 1)) for (hk, hv), (k, v) in zip(head, tail, strict=True)]


def _right_align(past: list[KV | None], p_len: int, dest: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Write each row's cached keys and values into ``dest`` (per layer, [batch, heads, ≥ p_len, dim]),
    ending at position ``p_len``: the positions before a shorter row's cache stay padding."""
    for i, kv in enumerate(past):
        for (k_dest, v_dest), (k, v) in zip(dest, kv or [], strict=False):
            n = k.shape[1]
            k_dest[i, :, p_len - n : p_len], v_dest[i, :, p_len - n : p_len] = k, v


@dataclass
class Decoded:
    """One batch's replies: per row the sampled token ids [n_i] (stop token excluded), their
    log-probabilities under the model's own distribution [n_i] (temperature 1, no top-p; natural
    log), and, where asked, the keys and values of the prompt and the reply before its stop token,
    from token ``offset`` on (the shared prefix's length when it was kept apart, else 0)."""

    tokens: list[list[int]]
    logprobs: list[list[float]]
    kv: list[KV | None]
    offset: int = 0


class DecodeEngine:
    """Batched prefill and sampling for one transformers causal LM; see the module docstring."""

    def __init__(self, model, pad_id: int, stop_ids: set[int], sampling: Sampling, name: str = "model") -> None:
        self.model = model
        self.name = name
        self.pad_id = pad_id
        self.stop_ids = stop_ids
        self.sampling = sampling
        self.device = next(model.parameters()).device
        self.window = sliding_window(model.config, name)
        self.roomy = True
        """Write new keys and values in place (False: transformers' own ``DynamicCache``, kept to
        check the in-place cache against it)."""
        self.cascade = hf_attention.enable(model)
        """Keep a batch's shared prefix once and attend over it apart (``hf_attention``); False:
        copy it into every row."""

    def fits_window(self, prompts: list[list[int]], reuse: list[int]) -> bool:
        """Whether a batch whose rows take ``reuse`` tokens from caches decodes exactly under the
        model's sliding window: the batch spans cached part, padding, new part and reply in more
        columns than a row has positions, so all of them must fit in the window."""
        if self.window is None or not any(reuse):
            return True
        columns = max(reuse) + max(len(ids) - n for ids, n in zip(prompts, reuse, strict=True))
        return columns + self.sampling.max_new_tokens <= self.window

    @torch.inference_mode()
    def prefill(self, tokens: list[int]) -> KV | None:
        """Keys and values of ``tokens`` for one conversation, or None when a sliding layer of
        transformers' cache kept fewer positions than there are tokens."""
        from transformers.cache_utils import DynamicCache

        cache = DynamicCache(config=self.model.config)
        self.model(input_ids=torch.tensor([tokens], device=self.device), cache=cache, use_cache=True, logits_to_keep=1)
        kv = [(layer.keys[0], layer.values[0]) for layer in cache.layers]
        return None if any(k.shape[1] != len(tokens) for k, _ in kv) else kv

    @torch.inference_mode()
    def score(self, prompt: list[int], continuations: list[list[int]]) -> list[list[float]]:
        """Per continuation, the log-probability (natural log, temperature 1) of each of its
        tokens after ``prompt``: ``prompt`` [P] token ids (P ≥ 1), ``continuations`` N lists of
        token ids (each non-empty) → N lists of as many floats. One batched forward pass, teacher
        forced. The prompt's tokens but its last are computed once and attended to apart
        (``hf_attention``) where the model allows and they fit its sliding window; otherwise every
        row holds the whole prompt (left-padded, the logits kept only for the continuations)."""
        head = prompt[:-1]
        longest = max(len(c) for c in continuations)
        fits = self.window is None or len(prompt) + longest <= self.window
        prefix = self.prefill(head) if self.cascade and head and fits else None
        shared = hf_attention.SharedPrefix(prefix) if prefix is not None else None
        start = len(head) if shared else 0
        rows = [prompt[start:] + c for c in continuations]
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        positions = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):  # left padding: every row's continuation ends at the last column
            input_ids[i, width - len(row) :] = torch.tensor(row)
            mask[i, width - len(row) :] = 1
            positions[i, width - len(row) :] = torch.arange(start, start + len(row))
        extra = {"shared_prefix": shared} if shared else {}
        logits = self.model(
            input_ids=input_ids.to(self.device),
            attention_mask=mask.to(self.device),
            position_ids=positions.to(self.device),
            use_cache=False,
            logits_to_keep=longest + 1,
            **extra,
        ).logits[:, :-1]  # [N, longest, V]: column j predicts the token at column j + 1
        if shared and len(shared.served) != len(prefix):  # type: ignore[arg-type]
            log.warning("%s: the shared prefix did not reach every layer; scoring with the whole prompt in each row",
                        self.name)  # fmt: skip
            self.cascade = False
            return self.score(prompt, continuations)
        logps = torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), -1)
        out = []
        for i, c in enumerate(continuations):
            picked = logps[i, longest - len(c) :].gather(-1, torch.tensor(c, device=self.device)[:, None])
            out.append(picked[:, 0].tolist())
        return out

    @torch.inference_mode()
    def decode(
        self,
        prompts: list[list[int]],
        past: list[KV | None],
        seeds: list[int],
        keep: list[bool],
        prefix: KV | None = None,
    ) -> Decoded:
        """Sample one reply per prompt. ``prefix``: keys and values of the first P tokens of every
        prompt (per layer [kv_heads, P, head_dim]), or None (P = 0). ``past[i]``: keys and values
        of the tokens of ``prompts[i]`` after those P (together, at most all but its last), or
        None; ``seeds[i]`` seeds row i's draws alone, so a reply does not depend on the batch;
        ``keep[i]``: return row i's keys and values (``Decoded.offset`` says from which token)."""
        if prefix is not None and not self.cascade:  # copies of the prefix in every row
            past = [join_kv(prefix, kv) for kv in past]
            prefix = None
        shared = hf_attention.SharedPrefix(prefix) if prefix is not None else None
        start = shared.length if shared else 0
        s = self.sampling
        batch = len(prompts)
        reuse = [start + (kv[0][0].shape[1] if kv else 0) for kv in past]
        new = [ids[n:] for ids, n in zip(prompts, reuse, strict=True)]
        # 1. One left-padded batch: [cached | new], masks and positions per row; the mask has room
        #    for the reply, so a step marks one more column instead of growing it.
        #    Columns hold each row's own keys only; positions count the shared prefix too.
        p_len, n_len = max(reuse) - start, max(len(x) for x in new)
        width = p_len + n_len
        input_ids = torch.full((batch, n_len), self.pad_id, dtype=torch.long)
        full_mask = torch.zeros((batch, width + s.max_new_tokens), dtype=torch.long)
        positions = torch.zeros((batch, n_len), dtype=torch.long)
        for i, (ids, n) in enumerate(zip(new, reuse, strict=True)):
            input_ids[i, n_len - len(ids) :] = torch.tensor(ids)
            full_mask[i, p_len - (n - start) : p_len] = 1
            full_mask[i, width - len(ids) : width] = 1
            positions[i, n_len - len(ids) :] = torch.arange(n, n + len(ids))
        cache = self._batch_cache(past, p_len, n_len + s.max_new_tokens)
        input_ids, full_mask, positions = (x.to(self.device) for x in (input_ids, full_mask, positions))
        gens = [torch.Generator(device="cpu").manual_seed(int(seed) % (2**63)) for seed in seeds]
        out = Decoded([[] for _ in range(batch)], [[] for _ in range(batch)], [None] * batch, start)
        extra = {"shared_prefix": shared} if shared else {}
        rows: list[int | None] = list(range(batch))  # each batch row's prompt; None once its reply ended
        step_ids = input_ids
        # 2. Decode: one token per live row per step.
        for step in range(s.max_new_tokens):
            mask = full_mask if self.roomy else full_mask[:, :width]  # the in-place cache's whole buffer
            if shared:
                shared.filled = width
            logits = self.model(
                input_ids=step_ids,
                attention_mask=mask,
                position_ids=positions,
                cache=cache,
                use_cache=True,
                logits_to_keep=1,  # the next token's only: a prefill needs no logits for its other positions
                **extra,
            ).logits[:, -1, :]
            if shared and step == 0 and len(shared.served) != len(prefix):  # type: ignore[arg-type]
                # A family whose layers do not hand the keyword down never saw the prefix: its
                # logits are wrong. Copy the prefix into the rows from now on, and decode again.
                log.warning("%s: the shared prefix did not reach %d of %d layers; copying it into every row instead",
                            self.name, len(prefix) - len(shared.served), len(prefix))  # type: ignore[arg-type]  # fmt: skip
                self.cascade = False
                return self.decode(prompts, past, seeds, keep, prefix)
            live = [j for j, r in enumerate(rows) if r is not None]
            drawn = self.sample(logits[live], [gens[rows[j]] for j in live])  # type: ignore[index]
            logps = torch.log_softmax(logits[live].float(), -1).gather(-1, drawn[:, None])[:, 0].tolist()
            fed = [self.pad_id] * len(rows)  # what each row reads next (ended rows: padding, ignored)
            for j, tok, logp in zip(live, drawn.tolist(), logps, strict=True):
                r = rows[j]
                fed[j] = tok
                stopped = tok in self.stop_ids
                if stopped or step == s.max_new_tokens - 1:
                    rows[j] = None
                    if keep[r]:  # the cache holds every token fed so far: the prompt and the reply before `tok`
                        out.kv[r] = self._row_kv(
                            cache, full_mask[:, :width], j, len(prompts[r]) + len(out.tokens[r]) - start
                        )
                if not stopped:
                    out.tokens[r].append(tok)
                    out.logprobs[r].append(logp)
            keep_rows = [j for j, r in enumerate(rows) if r is not None]
            if not keep_rows:
                break
            nxt = torch.tensor(fed, dtype=torch.long)
            # Ended rows ride along (their tokens are ignored) until they are a quarter of the batch:
            # dropping a row copies the whole cache, so it is done in bulk, not at every ending.
            if len(rows) - len(keep_rows) > len(rows) // 4:
                idx = torch.tensor(keep_rows, device=self.device)
                cache.batch_select_indices(idx)
                full_mask, positions, nxt = full_mask[idx], positions[idx], nxt[idx]
                rows = [rows[j] for j in keep_rows]
            full_mask[:, width] = 1
            width += 1
            positions = positions[:, -1:] + 1
            step_ids = nxt.unsqueeze(1).to(self.device)
        return out

    def sample(self, logits: torch.Tensor, gens: list[torch.Generator]) -> torch.Tensor:
        """One token per row of ``logits`` [B, V] → [B], drawn by inverse CDF: each row takes a
        single uniform number from its own seeded generator, so a row's draw depends on its seed
        and its logits alone, whatever the batch; the cumulative sums and the search run batched,
        on the model's device (4× less time than one multinomial draw per row, bench/RESULTS.md).
        Logits that differ in their last bits (another batch shape, a shared prefix computed
        apart) can move a draw that falls right at a boundary of the cumulative sums: a rare
        different token, never a different distribution. Temperature 0: the argmax."""
        s = self.sampling
        if s.temperature <= 0:
            return logits.argmax(dim=-1)
        probs = torch.softmax(logits.float() / s.temperature, dim=-1)
        if s.top_p < 1.0:
            sorted_p, order = probs.sort(dim=-1, descending=True)
            drop = sorted_p.cumsum(dim=-1) - sorted_p > s.top_p
            sorted_p[drop] = 0
            probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
        cdf = probs.cumsum(dim=-1)
        total = cdf[:, -1:].contiguous()
        u = torch.cat([torch.rand(1, generator=g, dtype=torch.float64) for g in gens]).to(cdf.device)
        target = (u.unsqueeze(1) * total.double()).to(cdf.dtype)
        # The first token whose cumulative mass exceeds u·total, never past the last token with any
        # mass (u·total can round up to the total): a token of zero probability is never drawn.
        drawn = torch.searchsorted(cdf, target, right=True)
        return torch.minimum(drawn, torch.searchsorted(cdf, total)).squeeze(1)

    def _batch_cache(self, past: list[KV | None], p_len: int, room: int):
        """A cache for the batch: each row's cached keys and values right-aligned in ``p_len``
        positions (left padding), with ``room`` more positions for the new tokens. Every layer
        keeps every position (sliding layers included: the mask applies the window)."""
        from transformers.cache_utils import Cache, DynamicCache

        ref = next((p for p in past if p is not None), None) if p_len else None
        if not self.roomy:
            if ref is None:
                return DynamicCache()
            shape = [(len(past), k.shape[0], p_len, k.shape[2]) for k, _ in ref]
            dest = [
                (k.new_zeros(n, device=self.device), k.new_zeros(n, device=self.device))
                for (k, _), n in zip(ref, shape, strict=True)
            ]
            _right_align(past, p_len, dest)
            return DynamicCache(ddp_cache_data=dest)
        layers = [_roomy_layer_class()(room) for _ in range(self.model.config.get_text_config().num_hidden_layers)]
        if ref is not None:
            for layer, (k0, _) in zip(layers, ref, strict=True):
                layer.reserve(len(past), k0.shape[0], p_len, k0.shape[2], k0.dtype, self.device)
            _right_align(past, p_len, [(layer._k, layer._v) for layer in layers])
        return Cache(layers=layers)

    @staticmethod
    def _row_kv(cache, mask: torch.Tensor, row: int, n_tokens: int) -> KV | None:
        """Batch row ``row``'s keys and values at its unmasked columns, or None when they are not
        its ``n_tokens`` tokens (a layer kept fewer positions)."""
        if any(layer.keys.shape[-2] != mask.shape[1] for layer in cache.layers):
            return None
        valid = mask[row].nonzero().squeeze(-1)
        kv = [(layer.keys[row][:, valid].clone(), layer.values[row][:, valid].clone()) for layer in cache.layers]
        return kv if kv[0][0].shape[1] == n_tokens else None
