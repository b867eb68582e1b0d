"""transformers backend: batched sampling with per-conversation KV-cache reuse.

Each ``complete`` call (``act``, for a batch of game turns) prefills and decodes every prompt of
the batch together; model loading, chat rendering and stop tokens come from ``hf_layer``. With
``prefix_reuse`` on, the agent keeps, per conversation (game, player), the keys and values of
the tokens it has already processed; at the next turn only the tokens after the longest common
prefix with the new prompt are prefilled. With ``share_prefix`` on as well, the token prefix that
the batch's new conversations have in common (the system prompt up to the game's own facts, see
``prompts.system_prompt``) is prefilled once and serves every conversation that begins with it.
Rows of different lengths share one batch: cached keys/values are left-padded to a common
length, new tokens are left-padded too, and the attention mask and explicit position ids keep
every row's positions right. Keys and values are
written in place into room reserved for the reply. Rows whose reply has ended leave the batch
in bulk, once they are a quarter of it (each removal copies the cache). A batch that runs out of
GPU memory is halved and tried again, with a warning, down to one conversation.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import torch

from parlay.agents import hf_layer
from parlay.agents.base import AgentError, ModelAgent, Prompt, Reply, Sampling
from parlay.agents.hf_layer import default_device, pick_dtype

log = logging.getLogger(__name__)

KV = list[tuple[torch.Tensor, torch.Tensor]]
"""Per layer (keys, values), each [heads, tokens, head_dim] for one conversation."""


@dataclass
class _Entry:
    tokens: list[int]
    kv: KV
    last_used: int


@functools.cache
def _roomy_layer_class():
    """The class, built once: transformers is imported only when a model is."""
    from transformers.cache_utils import DynamicLayer

    class RoomyLayer(DynamicLayer):
        """One layer's keys and values for a batch, with room for the whole reply: a new token is
        written in place. (``DynamicLayer`` concatenates, copying the whole cache at every step of
        every layer.)"""

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
            if end > self._k.shape[-2]:  # more than planned: grow once more
                extra = torch.zeros_like(self._k[:, :, : end - self._k.shape[-2]])
                self._k, self._v = torch.cat([self._k, extra], -2), torch.cat([self._v, extra], -2)
            self._k[:, :, self.length : end] = key_states
            self._v[:, :, self.length : end] = value_states
            self._set_length(end)
            return self.keys, self.values

        def get_seq_length(self) -> int:
            return self.length

        def batch_select_indices(self, indices: torch.Tensor) -> None:
            if self.is_initialized:
                self._k, self._v = self._k[indices], self._v[indices]
                self._set_length(self.length)

    return RoomyLayer


def load_model(name: str, adapter: str | None = None, dtype: str = "auto", device: str | None = None):
    """(model, tokenizer) ready to play: an adapter merged in, in eval mode, on ``device``."""
    device = device or default_device()
    model, tokenizer = hf_layer.load(name, adapter, pick_dtype(dtype, device), device)
    return model.eval(), tokenizer


def _right_align(past: list[KV | None], p_len: int, dest: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Write each row's cached keys and values into ``dest`` (per layer, [batch, heads, ≥ p_len, dim]),
    ending at position ``p_len``: the positions before a shorter row's cache stay padding."""
    for i, kv in enumerate(past):
        for (k_dest, v_dest), (k, v) in zip(dest, kv or [], strict=False):
            n = k.shape[1]
            k_dest[i, :, p_len - n : p_len], v_dest[i, :, p_len - n : p_len] = k, v


MIN_SHARED_PREFIX = 16
"""Fewer common tokens than this are not worth a forward pass of their own."""
MAX_SHARED_PREFIXES = 4


def _lcp(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


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
            raise AgentError(f"{name}: layers of kind {', '.join(unknown)} are not supported by the transformers "
                             "decoder (it knows full and sliding attention); play this model through "
                             "an openai: endpoint or vllm: instead")  # fmt: skip
        return window if "sliding_attention" in kinds and window else None
    return window or None


class HFAgent(ModelAgent):
    """A transformers causal LM playing many conversations at once."""

    def __init__(
        self,
        model,
        tokenizer,
        sampling: Sampling | None = None,
        prefix_reuse: bool = True,
        spec: str = "hf",
        share_prefix: bool = True,
        max_batch: int = 64,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.sampling = sampling or Sampling()
        self.prefix_reuse = prefix_reuse
        self.share_prefix = share_prefix and prefix_reuse
        self.spec = spec
        self.max_batch = max_batch
        self.device = next(model.parameters()).device
        self._cache: dict[tuple[str, str], _Entry] = {}
        self._shared: list[_Entry] = []
        """Token prefixes that begin many conversations, with their keys and values."""
        self._calls = 0
        self.stop_ids = hf_layer.stop_ids(tokenizer, getattr(model, "generation_config", None))
        hf_layer.check_template(tokenizer, spec, self.stop_ids)
        self.window = sliding_window(model.config, spec)
        """The shortest sliding attention window of the model's layers (None: every layer attends to
        the whole sequence). Every layer keeps all its keys and values here, and transformers' own
        mask applies the window: exact while a batch's columns are a conversation's positions, or
        all fit in the window (``generate`` turns reuse off for good otherwise)."""
        self._roomy = True
        """Write new keys and values in place (False: transformers' own ``DynamicCache``, kept to
        check the in-place cache against it)."""
        self.stats = {"prefill_tokens": 0, "reused_tokens": 0, "generated_tokens": 0}
        """Running counts: tokens prefilled, taken from the cache, and generated."""
        self.conversation_tokens: dict[tuple[str, str], int] = {}
        """Per conversation, the longest token sequence it reached (prompt + reply)."""

    # -- prompts

    def complete(self, prompts: list[Prompt]) -> list[Reply]:
        self._calls += 1
        replies: list[Reply] = []
        start = 0
        while start < len(prompts):
            chunk = prompts[start : start + self.max_batch]
            encoded = [hf_layer.render(self.tokenizer, p.messages, generation_prompt=True) for p in chunk]
            try:
                outs, logps = self.sample(encoded, [p.key for p in chunk], [p.seed for p in chunk])
            except torch.OutOfMemoryError:
                if len(chunk) == 1:
                    raise
                # Seeded replies do not depend on the batch (up to float rounding), so a smaller batch
                # gives the same games.
                self.max_batch = max(1, len(chunk) // 2)
                log.warning("out of memory decoding %d conversations at once: retrying in batches of %d "
                            "(set rollout.batch lower to start there)", len(chunk), self.max_batch)  # fmt: skip
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                continue
            for out, lp in zip(outs, logps, strict=True):
                text = self.tokenizer.decode(out, skip_special_tokens=True).strip()
                replies.append(Reply(text, tokens=len(out), logprobs=[round(x, 5) for x in lp]))
            start += len(chunk)
        self._evict()
        return replies

    def _evict(self) -> None:
        """Forget conversations this agent has not served for a few calls (finished games)."""
        stale = [k for k, e in self._cache.items() if self._calls - e.last_used > 4]
        for k in stale:
            del self._cache[k]
        self._shared = [e for e in self._shared if self._calls - e.last_used <= 4]

    # -- generation

    def generate(
        self, prompts: list[list[int]], keys: list[tuple[str, str]] | None, seeds: list[int]
    ) -> list[list[int]]:
        """Sample one continuation per prompt; returns the generated token ids (stop token excluded)."""
        return self.sample(prompts, keys, seeds)[0]

    @torch.inference_mode()
    def sample(
        self, prompts: list[list[int]], keys: list[tuple[str, str]] | None, seeds: list[int]
    ) -> tuple[list[list[int]], list[list[float]]]:
        """Sample one continuation per prompt (token ids, one list per prompt ``[n_i]``, stop token
        excluded), with each token's log-probability under the model's own distribution
        (temperature 1, no top-p; natural log), the figures ``protocol.Turn.logprobs`` records."""
        s = self.sampling
        batch = len(prompts)
        keys = keys or [None] * batch  # type: ignore[list-item]
        # 1. What each row can take from its conversation's cache or from a shared prefix.
        own = [self._cache.get(key) if (self.prefix_reuse and key is not None) else None for key in keys]
        if self.share_prefix:
            self._add_shared_prefix([ids for ids, entry in zip(prompts, own, strict=True) if entry is None])
        reuse: list[int] = []
        past: list[KV | None] = []
        for entry, ids in zip(own, prompts, strict=True):
            candidates = ([entry] if entry else []) + (self._shared if self.share_prefix else [])
            n, best = max(
                ((min(_lcp(e.tokens, ids), len(ids) - 1), e) for e in candidates), default=(0, None), key=lambda t: t[0]
            )
            if best is not None and n:
                best.last_used = self._calls
            reuse.append(n)
            past.append([(k[:, :n], v[:, :n]) for k, v in best.kv] if best is not None and n else None)
        if self.window is not None and any(reuse) and self._beyond_window(prompts, reuse):
            reuse, past = [0] * batch, [None] * batch
        new = [ids[n:] for ids, n in zip(prompts, reuse, strict=True)]
        self.stats["reused_tokens"] += sum(reuse)
        self.stats["prefill_tokens"] += sum(len(x) for x in new)
        # 2. One left-padded batch: [cached | new], masks and positions per row; the mask has room
        #    for the reply, so a step marks one more column instead of growing it.
        p_len, n_len = max(reuse), max(len(x) for x in new)
        width = p_len + n_len
        pad_id = self.tokenizer.pad_token_id
        input_ids = torch.full((batch, n_len), pad_id, dtype=torch.long)
        full_mask = torch.zeros((batch, width + s.max_new_tokens), dtype=torch.long)
        positions = torch.zeros((batch, n_len), dtype=torch.long)
        for i, (ids, n) in enumerate(zip(new, reuse, strict=True)):
            input_ids[i, n_len - len(ids) :] = torch.tensor(ids)
            full_mask[i, p_len - n : p_len] = 1
            full_mask[i, width - len(ids) : width] = 1
            positions[i, n_len - len(ids) :] = torch.arange(n, n + len(ids))
        cache = self._batch_cache(past, p_len, n_len + s.max_new_tokens)
        input_ids, full_mask, positions = (
            input_ids.to(self.device),
            full_mask.to(self.device),
            positions.to(self.device),
        )
        gens = [torch.Generator(device="cpu").manual_seed(int(seed) % (2**63)) for seed in seeds]
        out_tokens: list[list[int]] = [[] for _ in range(batch)]
        out_logps: list[list[float]] = [[] for _ in range(batch)]
        rows: list[int | None] = list(range(batch))  # each batch row's prompt; None once its reply ended
        step_ids = input_ids
        for step in range(s.max_new_tokens):
            mask = full_mask[:, :width]
            logits = self.model(
                input_ids=step_ids,
                attention_mask=mask,
                position_ids=positions,
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,  # the next token's only: a prefill needs no logits for its other positions
            ).logits[:, -1, :]
            live = [j for j, r in enumerate(rows) if r is not None]
            sampled_t = self._sample(logits[live], [gens[rows[j]] for j in live])  # type: ignore[index]
            logps = torch.log_softmax(logits[live].float(), -1).gather(-1, sampled_t[:, None])[:, 0].tolist()
            sampled = sampled_t.tolist()
            fed = [pad_id] * len(rows)  # what each row reads next (ended rows: padding, ignored)
            for j, tok, logp in zip(live, sampled, logps, strict=True):
                r = rows[j]
                fed[j] = tok
                stopped = tok in self.stop_ids
                if stopped or step == s.max_new_tokens - 1:
                    rows[j] = None
                    # The cache holds every token fed so far: the prompt and the reply before `tok`.
                    if keys[r] is not None and self.prefix_reuse:
                        self._store(keys[r], prompts[r] + out_tokens[r], cache, mask, j)
                if not stopped:
                    out_tokens[r].append(tok)
                    out_logps[r].append(logp)
            keep = [j for j, r in enumerate(rows) if r is not None]
            if not keep:
                break
            nxt = torch.tensor(fed, dtype=torch.long)
            # Ended rows ride along (their tokens are ignored) until they are a quarter of the batch:
            # dropping a row copies the whole cache, so it is done in bulk, not at every ending.
            if len(rows) - len(keep) > len(rows) // 4:
                idx = torch.tensor(keep, device=self.device)
                cache.batch_select_indices(idx)
                full_mask, positions, nxt = full_mask[idx], positions[idx], nxt[idx]
                rows = [rows[j] for j in keep]
            full_mask[:, width] = 1
            width += 1
            positions = positions[:, -1:] + 1
            step_ids = nxt.unsqueeze(1).to(self.device)
        self.stats["generated_tokens"] += sum(len(t) for t in out_tokens)
        for key, ids, out in zip(keys, prompts, out_tokens, strict=True):
            if key is not None:
                self.conversation_tokens[key] = max(self.conversation_tokens.get(key, 0), len(ids) + len(out))
        return out_tokens, out_logps

    def _beyond_window(self, prompts: list[list[int]], reuse: list[int]) -> bool:
        """Whether this batch, with the tokens ``reuse`` taken from caches, spans more columns than
        the sliding window (cached part, padding, new part, reply: more columns than positions, so
        the window, which transformers applies to columns, would cut at the wrong place). If so,
        cache reuse is turned off for this agent for good, said once in the log; without reuse every
        row's columns are its positions and the window is applied exactly."""
        columns = max(reuse) + max(len(ids) - n for ids, n in zip(prompts, reuse, strict=True))
        if columns + self.sampling.max_new_tokens <= self.window:  # type: ignore[operator]
            return False
        log.info("%s: a conversation outgrows the model's sliding window of %d tokens: cache reuse turned off",
                 self.spec, self.window)  # fmt: skip
        self.prefix_reuse = self.share_prefix = False
        self._cache.clear()
        self._shared.clear()
        return True

    def _add_shared_prefix(self, fresh: list[list[int]]) -> None:
        """Prefill, once, the token prefix that the new conversations ``fresh`` share, unless a
        stored shared prefix already covers it."""
        if len(fresh) < 2:
            return
        n = min(len(ids) for ids in fresh) - 1
        for ids in fresh[1:]:
            n = min(n, _lcp(fresh[0], ids))
        if n < MIN_SHARED_PREFIX or any(_lcp(e.tokens, fresh[0]) >= n for e in self._shared):
            return
        from transformers.cache_utils import DynamicCache

        cache = DynamicCache(config=self.model.config)
        ids = torch.tensor([fresh[0][:n]], device=self.device)
        self.model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        kv = [(layer.keys[0], layer.values[0]) for layer in cache.layers]
        if any(k.shape[1] != n for k, _ in kv):  # a sliding-window layer kept fewer positions
            return
        self.stats["prefill_tokens"] += n
        self._shared = [
            *self._shared[-(MAX_SHARED_PREFIXES - 1) :],
            _Entry(tokens=fresh[0][:n], kv=kv, last_used=self._calls),
        ]

    def _sample(self, logits: torch.Tensor, gens: list[torch.Generator]) -> torch.Tensor:
        """One token per row, drawn by inverse CDF: each row takes a single uniform number from its
        own seeded generator, so a row's draw depends on its seed and its logits alone, whatever
        the batch; the cumulative sums and the search run batched, on the model's device (4× less
        time than one multinomial draw per row, bench/RESULTS.md). Logits that differ in their last
        bits (another batch shape, a shared prefix computed apart) can move a draw that falls
        right at a boundary of the cumulative sums: a rare different token, never a different
        distribution."""
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
        positions (left padding), with ``room`` more positions for the new tokens."""
        from transformers.cache_utils import Cache, DynamicCache

        ref = next((p for p in past if p is not None), None) if p_len else None
        if not self._roomy:
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

    def _store(self, key: tuple[str, str], tokens: list[int], cache, mask: torch.Tensor, row: int) -> None:
        if any(layer.keys.shape[-2] != mask.shape[1] for layer in cache.layers):
            log.debug("a cache layer kept fewer positions than the batch has; not stored")
            return
        valid = mask[row].nonzero().squeeze(-1)
        kv = [(layer.keys[row][:, valid].clone(), layer.values[row][:, valid].clone()) for layer in cache.layers]
        if kv[0][0].shape[1] != len(tokens):
            log.debug("cache length %d != %d tokens; not stored", kv[0][0].shape[1], len(tokens))
            return
        self._cache[key] = _Entry(tokens=tokens, kv=kv, last_used=self._calls)

    def close(self) -> None:
        self._cache.clear()
        self._shared.clear()
