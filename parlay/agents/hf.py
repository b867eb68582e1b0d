"""The transformers agent: a conversation cache policy over a token-level engine.

``HFAgent.complete`` (``act``, for a batch of game turns) renders every prompt through
``hf_layer`` (the chat format shared with the trainer) and decodes them together on
``hf_engine.DecodeEngine``. Above the engine, this module decides what each conversation takes
from what was already computed: with ``prefix_reuse`` on, the agent keeps, per conversation
(game, player), the keys and values of the tokens it has processed, and at the next turn only
the tokens after the longest common prefix with the new prompt are prefilled. With
``share_prefix`` on as well, the token prefix that the batch's new conversations have in common
(the system prompt up to the game's own facts, see ``prompts.system_prompt``) is prefilled once
and serves every conversation that begins with it. A model whose sliding window a conversation
outgrows has reuse turned off for good, with one log line (``DecodeEngine.fits_window``). A
batch that runs out of GPU memory is halved and tried again, with a warning, down to one
conversation.

**The selection step** (``select``, off by default). People who have agreed in words still have
to enter the split in counts on a selection screen (Lewis et al. 2017, whose model read it off
the dialogue with a selection output of its own), and a small model that talks like them gets
the counts wrong when it writes them as text (docs/RESULTS.md: a human proxy's two proposals
rarely divide the items). With ``select``, whenever this agent proposes — a proposal is owed, or
its sampled reply is one (``protocol.is_proposal_attempt``) — the counts are chosen, not sampled:

1. the split that the conversation last put into words, when a message states one
   (``language.last_stated_split``, the reader the bots use);
2. otherwise the likeliest legal split under the model: every split written as a canonical
   proposal reply and scored given the conversation (``score_replies``).

When to propose stays the model's own choice, and its talk is sampled as always. The reply sent
is one the protocol accepts in form, and the log-probabilities it reports are the model's own for
that reply's tokens. On held human games, step 1 alone picks the people's own split for 58 % of
their proposals and step 2 alone for 21 % (docs/RESULTS.md).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from parlay.agents import hf_layer
from parlay.agents.base import ModelAgent, Prompt, Reply, Sampling, TemplateError, TurnRequest
from parlay.agents.hf_engine import KV, DecodeEngine, join_kv
from parlay.agents.hf_layer import default_device, pick_dtype
from parlay.agents.language import last_stated_split
from parlay.protocol import ChatMessage, is_proposal_attempt, proposal_reply
from parlay.specs import DEFAULT_BATCH

log = logging.getLogger(__name__)


@dataclass
class _Entry:
    """Cached keys and values of ``tokens``: those of the first ``len(base.tokens)`` in the shared
    prefix ``base`` (kept once for every conversation that begins with it), the rest in ``kv``."""

    tokens: list[int]
    kv: KV
    last_used: int
    base: _Entry | None = None

    def kv_of(self, start: int, end: int) -> KV | None:
        """Keys and values of tokens ``start``..``end`` (not past this entry's), None when empty."""
        offset = len(self.base.tokens) if self.base else 0
        if end <= start:
            return None
        if start < offset:
            head = self.base.kv_of(start, min(end, offset))  # type: ignore[union-attr]
            return join_kv(head, self.kv_of(offset, end))  # type: ignore[arg-type]
        return [(k[:, start - offset : end - offset], v[:, start - offset : end - offset]) for k, v in self.kv]


def load_model(name: str, adapter: str | None = None, dtype: str = "auto", device: str | None = None):
    """(model, tokenizer) ready to play: an adapter merged in, in eval mode, on ``device``."""
    device = device or default_device()
    model, tokenizer = hf_layer.load(name, adapter, pick_dtype(dtype, device), device)
    return model.eval(), tokenizer


MIN_SHARED_PREFIX = 16
"""Fewer common tokens than this are not worth a forward pass of their own."""
MAX_SHARED_PREFIXES = 4


def _lcp(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


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
        max_batch: int = DEFAULT_BATCH,
        select: bool = False,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.sampling = sampling or Sampling()
        self.prefix_reuse = prefix_reuse
        self.share_prefix = share_prefix and prefix_reuse
        self.spec = spec
        self.max_batch = max_batch
        self.select = select
        """Choose every proposal's counts (the selection step of the module docstring)."""
        self.stop_ids = hf_layer.stop_ids(tokenizer, getattr(model, "generation_config", None))
        hf_layer.check_template(tokenizer, spec, self.stop_ids)
        if select:  # refuse a template the selection step cannot score with now, not at the first proposal
            probe = [{"role": "system", "content": "Split the items."}, {"role": "user", "content": "hi"}]
            self._continuation(probe, proposal_reply((1, 0, 2)), hf_layer.render(tokenizer, probe, True))
        self.engine = DecodeEngine(model, tokenizer.pad_token_id, self.stop_ids, self.sampling, spec)
        self._cache: dict[tuple[str, str], _Entry] = {}
        self._shared: list[_Entry] = []
        """Token prefixes that begin many conversations, with their keys and values."""
        self._calls = 0
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
                if self.engine.device.type == "cuda":
                    torch.cuda.empty_cache()
                continue
            for out, lp in zip(outs, logps, strict=True):
                text = self.tokenizer.decode(out, skip_special_tokens=True).strip()
                replies.append(Reply(text, tokens=len(out), logprobs=[round(x, 5) for x in lp]))
            start += len(chunk)
        self._evict()
        return replies

    # -- game turns

    def act(self, requests: list[TurnRequest]) -> list[Reply]:
        """One reply per game turn, in order; with ``select``, a turn that owes a proposal is not
        sampled, and every proposal (owed or sampled) is the selection step's (``select_proposal``)."""
        if not self.select:
            return super().act(requests)
        talk = [i for i, r in enumerate(requests) if not r.proposal_owed]
        replies: list[Reply | None] = [None] * len(requests)
        for i, reply in zip(talk, super().act([requests[i] for i in talk]), strict=True):
            replies[i] = reply
        for i, request in enumerate(requests):
            reply = replies[i]
            if reply is None or is_proposal_attempt(reply.text):
                replies[i] = self.select_proposal(request)
        return replies  # type: ignore[return-value]

    def select_proposal(self, request: TurnRequest) -> Reply:
        """The proposal reply of the selection step (the module docstring): the split the
        conversation last stated, else, of every legal split of ``request``'s items (the counts
        this player keeps, ``Context.allocations``), the one the model finds likeliest given the
        conversation (summed log-probability of the reply's tokens and its end-of-turn token;
        the first of equals in the order of ``allocations``)."""
        stated = last_stated_split(request.messages, request.context.counts)
        splits = [stated] if stated is not None else list(request.context.allocations)
        texts = [proposal_reply(kept) for kept in splits]
        scored = self.score_replies(request.messages, texts)
        best = max(range(len(texts)), key=lambda i: scored[i][0])
        own = scored[best][1]
        return Reply(texts[best], tokens=len(own), logprobs=[round(x, 5) for x in own])

    def score_replies(self, messages: list[ChatMessage], replies: list[str]) -> list[tuple[float, list[float]]]:
        """Per reply, as the assistant's next turn after ``messages``, tokenised as the trainer
        does (``hf_layer.encode_conversation``): the summed log-probability (nats) of every token
        the template writes after the generation prompt up to and including the end-of-turn token
        (the reply's text and whatever the template adds around it, the same for every reply),
        and the log-probability of each token of the reply's text. One batched pass
        (``DecodeEngine.score``). ``TemplateError``: the template does not render a reply after its
        generation prompt (refused when an agent with ``select`` is made; here a guard)."""
        prompt = hf_layer.render(self.tokenizer, messages, generation_prompt=True)
        continuations, spans = [], []
        for text in replies:
            ids, span = self._continuation(messages, text, prompt)
            continuations.append(ids)
            spans.append(span)
        scored = self.engine.score(prompt, continuations)
        return [(sum(logps), logps[a:b]) for logps, (a, b) in zip(scored, spans, strict=True)]

    def _continuation(
        self, messages: list[ChatMessage], text: str, prompt: list[int]
    ) -> tuple[list[int], tuple[int, int]]:
        """The token ids the template writes after ``prompt`` (the generation prompt of
        ``messages``) for the assistant reply ``text``, up to and including its end-of-turn token,
        and the [start, end) span of the reply's text among them. ``TemplateError``: the prompt is
        not where that rendering starts, or no stop token follows the reply."""
        encoded = hf_layer.encode_conversation(
            self.tokenizer, [*messages, {"role": "assistant", "content": text}], generation_prompt=False
        )
        ids, (start, end) = encoded.ids, encoded.turns[-1]
        stop = next((i for i in range(end, len(ids)) if ids[i] in self.stop_ids), None)
        if ids[: len(prompt)] != prompt or start < len(prompt) or stop is None:
            raise TemplateError(
                f"{self.spec}: the chat template does not write an assistant reply after its generation prompt, "
                "ending in a stop token; the selection step (select=1) cannot score replies with it"
            )
        return ids[len(prompt) : stop + 1], (start - len(prompt), end - len(prompt))

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

    def sample(
        self, prompts: list[list[int]], keys: list[tuple[str, str]] | None, seeds: list[int]
    ) -> tuple[list[list[int]], list[list[float]]]:
        """Sample one continuation per prompt (token ids, one list per prompt ``[n_i]``, stop token
        excluded), with each token's log-probability under the model's own distribution
        (temperature 1, no top-p; natural log), the figures ``protocol.Turn.logprobs`` records.
        ``keys`` name each prompt's conversation (None: no reuse)."""
        batch = len(prompts)
        keys = keys or [None] * batch  # type: ignore[list-item]
        reuse, base, past = self._lookup(prompts, keys)
        self.stats["reused_tokens"] += sum(reuse)
        self.stats["prefill_tokens"] += sum(len(ids) - n for ids, n in zip(prompts, reuse, strict=True))
        keep = [self.prefix_reuse and key is not None for key in keys]
        out = self.engine.decode(prompts, past, seeds, keep, base.kv if base else None)
        self.stats["generated_tokens"] += sum(len(t) for t in out.tokens)
        for key, ids, toks, kv in zip(keys, prompts, out.tokens, out.kv, strict=True):
            if key is None:
                continue
            self.conversation_tokens[key] = max(self.conversation_tokens.get(key, 0), len(ids) + len(toks))
            if kv is not None:  # the tokens fed: all but a cut reply's last token, which was drawn, never fed
                fed = (ids + toks)[: out.offset + kv[0][0].shape[1]]
                self._cache[key] = _Entry(fed, kv, self._calls, base if out.offset else None)
        return out.tokens, out.logprobs

    def _lookup(self, prompts: list[list[int]], keys: list) -> tuple[list[int], _Entry | None, list[KV | None]]:
        """Per prompt, how many of its first tokens come from its conversation's cache or a shared
        prefix (never all: the last token is fed to get the next one's logits); the shared prefix
        that every prompt's reused tokens begin with, if one does (its keys and values are kept
        once, ``hf_attention``); and per prompt the keys and values of the reused tokens after it."""
        own = [self._cache.get(key) if (self.prefix_reuse and key is not None) else None for key in keys]
        if self.share_prefix:
            self._add_shared_prefix([ids for ids, entry in zip(prompts, own, strict=True) if entry is None])
        reuse: list[int] = []
        chosen: list[_Entry | None] = []
        for entry, ids in zip(own, prompts, strict=True):
            candidates = ([entry] if entry else []) + (self._shared if self.share_prefix else [])
            n, best = max(
                ((min(_lcp(e.tokens, ids), len(ids) - 1), e) for e in candidates), default=(0, None), key=lambda t: t[0]
            )
            if best is not None and n:
                best.last_used = self._calls
            reuse.append(n)
            chosen.append(best if n else None)
        if not self.engine.fits_window(prompts, reuse):
            log.info("%s: a conversation outgrows the model's sliding window of %d tokens: cache reuse turned off",
                     self.spec, self.engine.window)  # fmt: skip
            self.prefix_reuse = self.share_prefix = False
            self._cache.clear()
            self._shared.clear()
            return [0] * len(prompts), None, [None] * len(prompts)
        # The batch's shared prefix: the one every row's reused tokens begin with (a fresh row's
        # candidate is the shared entry itself; a conversation's, the shared entry it began from).
        roots = {id(e.base or e): e.base or e for e in chosen if e is not None}  # never chained: a base has no base
        base = next(iter(roots.values())) if len(roots) == 1 and all(chosen) else None
        start = len(base.tokens) if base is not None and all(n >= len(base.tokens) for n in reuse) else 0
        past = [e.kv_of(start, n) if e is not None else None for e, n in zip(chosen, reuse, strict=True)]
        return reuse, base if start else None, past

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
        kv = self.engine.prefill(fresh[0][:n])
        if kv is None:
            return
        self.stats["prefill_tokens"] += n
        self._shared = [
            *self._shared[-(MAX_SHARED_PREFIXES - 1) :],
            _Entry(tokens=fresh[0][:n], kv=kv, last_used=self._calls),
        ]

    def close(self) -> None:
        self._cache.clear()
        self._shared.clear()
