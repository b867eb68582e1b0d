"""The one Hugging Face layer: what the decoder (``hf.py``) and the trainer (``improve/sft.py``)
must agree on, written once.

- ``load``: a model name, hub id or path (``models.resolve``) with its tokenizer, in a dtype, on a
  device, with a LoRA adapter merged in (play) or left trainable (training);
- ``render`` / ``encode_conversation``: a conversation as token ids through the tokenizer's own
  chat template, message text always plain text, each assistant turn its own tokens;
- ``assistant_mask``: which of those ids are the player's own turns (the training loss's mask);
- ``check_template``: a template that cannot serve refused before anything runs;
- ``stop_ids``: the tokens that end a reply, read from the tokenizer, the generation config and
  the chat template itself (the token the template writes after an assistant turn), never a
  template-specific string.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import re
import secrets
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from parlay.agents.base import AgentError, TemplateError
from parlay.agents.models import resolve
from parlay.protocol import ChatMessage

log = logging.getLogger(__name__)

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX), so bf16 is faster than fp32."""
    from parlay.agents.machine import cpu_flags, has_native_bf16

    return has_native_bf16(cpu_flags())


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def pick_dtype(name: str, device: str) -> torch.dtype:
    """``auto``: bf16 on GPU and on CPUs that compute it natively, else fp32, for play and training
    alike. Measured on an AVX512-BF16 CPU (docs/RESULTS.md, bench/RESULTS.md): bf16 trains 1.4×
    and decodes 2× as fast as fp32, and a LoRA adapter merged into bf16 weights keeps its effect
    (the trained model's next-token distributions differ from fp32's by a KL of 0.001 nats,
    against 1.4 without the adapter)."""
    if name == "auto":
        if device.startswith("cuda") or (device == "cpu" and cpu_has_bf16()):
            return torch.bfloat16
        return torch.float32
    try:
        dtype = DTYPES[name]
    except KeyError:
        raise AgentError(f"unknown dtype {name!r}: expected auto, {', '.join(DTYPES)}") from None
    if dtype == torch.bfloat16 and device == "cpu" and not cpu_has_bf16():
        log.warning("dtype %s asked for, but this CPU has no native bf16 (only a slow emulation): using float32", name)
        return torch.float32
    return dtype


@contextlib.contextmanager
def peft_quiet():
    """peft (0.21) asks a transformers 5 model ``is_gradient_checkpointing``, which transformers
    answers with a FutureWarning in every run's log; the question is peft's, not the user's."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
        yield


def load(
    name: str,
    adapter: str | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | None = None,
    trainable_adapter: bool = False,
):
    """(model, tokenizer) for a model name, hub id or path, in ``dtype`` on ``device``.

    An ``adapter`` is merged into the weights for play (decoding then costs what the base costs),
    or, with ``trainable_adapter``, kept as a trainable LoRA adapter to continue training. The
    tokenizer always has a pad token (its end-of-sequence token where it had none)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    path = resolve(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except (OSError, ValueError) as exc:
        raise AgentError(f"cannot load model {name!r}: {exc}") from None
    if adapter:
        from peft import PeftModel

        try:
            with peft_quiet():
                model = PeftModel.from_pretrained(model, adapter, is_trainable=trainable_adapter)
        except (OSError, ValueError) as exc:
            raise AgentError(f"cannot load adapter {adapter!r}: {exc}") from None
        if not trainable_adapter:
            model = model.merge_and_unload()
    if device is not None:
        model.to(device)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def render(tokenizer, messages: Sequence[ChatMessage], generation_prompt: bool) -> list[int]:
    """Token ids of a conversation through the tokenizer's chat template; with
    ``generation_prompt`` the ids end where the assistant starts writing. Message text is only
    ever plain text (``encode_conversation``)."""
    return encode_conversation(tokenizer, messages, generation_prompt).ids


@dataclass(frozen=True)
class Encoded:
    """A conversation as token ids: ``ids`` [T]; ``turns``, per assistant message in order, the
    [start, end) token span of its content (the end-of-turn token is the one after)."""

    ids: list[int]
    turns: list[tuple[int, int]]


def _content_spans(tokenizer, messages: Sequence[ChatMessage], generation_prompt: bool) -> tuple[str, list]:
    """The template's text and, per message whose content it writes, (message index, start, end)
    in characters. Found by rendering the template once more with a random marker in place of each
    content; the template must write each content unchanged (checked)."""
    kwargs = {"add_generation_prompt": generation_prompt, "tokenize": False}
    try:
        text = tokenizer.apply_chat_template(list(messages), **kwargs)
        nonce = secrets.token_hex(8)
        marked = [{**m, "content": f"PARLAY{nonce}M{i}X"} for i, m in enumerate(messages)]
        skeleton = tokenizer.apply_chat_template(marked, **kwargs)
    except Exception as exc:  # no template, or one that refuses these roles (jinja raises its own errors)
        raise TemplateError(f"the chat template cannot render a game's conversation: {exc}") from None
    rebuilt, spans = "", []
    for j, piece in enumerate(re.split(rf"PARLAY{nonce}M(\d+)X", skeleton)):
        if j % 2 == 0:
            rebuilt += piece
        else:
            i = int(piece)
            spans.append((i, len(rebuilt), len(rebuilt) + len(messages[i]["content"])))
            rebuilt += messages[i]["content"]
    if rebuilt != text:
        raise TemplateError(
            "the chat template changes the text of a message (it trims or rewrites it), so a turn's tokens "
            "cannot be told from the template's; use a template that writes content as given"
        )
    return text, spans


def _added_ids(tokenizer) -> set[int]:
    """Every token the tokenizer matches as a whole string before any other rule: its special
    tokens and added tokens (control tokens of the chat format among them)."""
    return set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}) or {})


def _anchor(tokenizer) -> str:
    """A special token's text: a piece encoded after it tokenises as it does after any special
    token (no prefix space added, nothing merged across), as the template's own text does."""
    for text in [tokenizer.eos_token, tokenizer.bos_token, tokenizer.pad_token, *tokenizer.all_special_tokens]:
        if isinstance(text, str) and text and len(tokenizer(text, add_special_tokens=False)["input_ids"]) == 1:
            return text
    raise TemplateError("the tokenizer has no special token of its own, so a chat turn's end cannot be told apart")


def _plain(tokenizer, text: str, added: set[int]) -> list[int]:
    """``text`` as plain-text tokens, none of them an added token: ``split_special_tokens`` splits
    special tokens only, so an added token that is not marked special (Qwen's ``<think>``,
    ``<tool_call>``) is split by halving the text until no piece matches one."""
    ids = tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    if len(text) < 2 or not any(t in added for t in ids):
        return ids
    half = len(text) // 2
    return _plain(tokenizer, text[:half], added) + _plain(tokenizer, text[half:], added)


def encode_conversation(tokenizer, messages: Sequence[ChatMessage], generation_prompt: bool) -> Encoded:
    """A conversation as token ids, tokenised as the model's own format tokenises it, with two
    departures that make play and training see the same thing:

    - **text is text.** Inside a message's content, a string that spells one of the tokenizer's
      special or added tokens (``<|im_start|>``, ``</s>``, ``[INST]``…) is encoded as the plain
      text it is, never as that control token: no reply, endpoint answer or person's message can
      forge a turn in anyone's prompt or training example (the game also refuses such replies,
      ``protocol.parse_reply``; this holds whatever the game lets through, e.g. a rejected
      attempt shown back to its writer).
    - **an assistant turn starts and ends a token.** The text is cut at the start and end of
      every assistant content and each piece tokenised on its own, so a token never straddles
      the template's text and the reply (a generation prompt ending in a space, ``…ASSISTANT: ``,
      would otherwise merge with the reply's first character). A prompt thus ends exactly where
      the model starts writing, and a trained reply's tokens are the reply's.

    Raises ``TemplateError`` when the template cannot render the conversation or rewrites a
    message's text."""
    text, spans = _content_spans(tokenizer, messages, generation_prompt)
    assistant = [(s, e) for i, s, e in spans if messages[i]["role"] == "assistant"]
    cuts = sorted({0, len(text), *(x for span in assistant for x in span)})
    added, anchor = _added_ids(tokenizer), _anchor(tokenizer)
    ids: list[int] = []
    starts: dict[int, int] = {}  # character position of a cut → index of its first token
    for a, b in itertools.pairwise(cuts):
        starts[a] = len(ids)
        if a == b:
            continue
        lead = anchor if a > 0 else ""
        enc = tokenizer(lead + text[a:b], add_special_tokens=False, return_offsets_mapping=True)
        for tid, (s, e) in zip(enc["input_ids"], enc["offset_mapping"], strict=True):
            if e <= len(lead) and s < len(lead):
                continue  # the anchor
            s, e = s - len(lead) + a, e - len(lead) + a
            if tid in added and any(cs <= s and e <= ce for _, cs, ce in spans):
                ids += _plain(tokenizer, text[s:e], added)
            else:
                ids.append(tid)
    starts[len(text)] = len(ids)
    return Encoded(ids, [(starts[s], starts[e]) for s, e in assistant])


def end_of_turn_id(tokenizer) -> int | None:
    """The special token the chat template writes right after an assistant turn's content
    (``<|im_end|>`` for ChatML, ``<|eot_id|>`` for Llama 3), or None if it writes none."""
    probe: list[ChatMessage] = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    try:
        enc = encode_conversation(tokenizer, probe, generation_prompt=False)
    except TemplateError:
        return None
    added = _added_ids(tokenizer)
    return next((t for t in enc.ids[enc.turns[0][1] :] if t in added), None) if enc.turns else None


def stop_ids(tokenizer, generation_config=None) -> set[int]:
    """Every token that ends a reply: the tokenizer's end-of-sequence token, the generation
    config's (one or several), and the chat template's end of turn; never the unknown token."""
    ids: list[int | None] = [tokenizer.eos_token_id, end_of_turn_id(tokenizer)]
    eos = getattr(generation_config, "eos_token_id", None)
    ids += eos if isinstance(eos, list) else [eos]
    return {t for t in ids if isinstance(t, int) and t >= 0 and t != tokenizer.unk_token_id}


def assistant_mask(
    tokenizer, messages: Sequence[ChatMessage], stops: set[int] | None = None
) -> tuple[list[int], list[int]]:
    """(input_ids, mask) of a whole conversation (``encode_conversation``); mask is 1 exactly on
    the tokens of each assistant turn's content and on what the template writes after it up to and
    including its end-of-turn token (a stop token: ``stop_ids``), which may be preceded only by
    whitespace. Raises ``TemplateError``, naming the boundary, when the template writes anything
    else after a turn, or no end of turn at all: a model trained on it would never learn to stop."""
    stops = stop_ids(tokenizer) if stops is None else stops
    enc = encode_conversation(tokenizer, messages, generation_prompt=False)
    mask = [0] * len(enc.ids)
    for start, end in enc.turns:
        mask[start:end] = [1] * (end - start)
        for j in range(end, len(enc.ids) + 1):
            if j == len(enc.ids) or (enc.ids[j] not in stops and tokenizer.decode([enc.ids[j]]).strip()):
                after = tokenizer.decode(enc.ids[end : end + 4])
                raise TemplateError(f"the chat template writes {after!r} after an assistant turn, not an end-of-turn "
                                    f"token (stop tokens: {sorted(stops)}); a template must close each assistant turn "
                                    "with its end-of-turn token (set the tokenizer's eos_token to it)")  # fmt: skip
            mask[j] = 1
            if enc.ids[j] in stops:
                break
    return enc.ids, mask


def check_template(tokenizer, name: str, stops: set[int] | None = None) -> None:
    """Refuse, before any game is played or step taken, a tokenizer whose chat template cannot
    serve: no template, one that rewrites messages, no end-of-turn token after an assistant turn,
    no stop token at all. Raises ``TemplateError`` naming the model and what to set."""
    probe: list[ChatMessage] = [
        {"role": "system", "content": "Rules."},
        {"role": "user", "content": "[message] Hello."},
        {"role": "assistant", "content": "[message] Hi."},
        {"role": "user", "content": "[message] Deal?"},
        {"role": "assistant", "content": "[propose] (1 book, 0 hats, 2 balls)"},
    ]
    if getattr(tokenizer, "chat_template", None) is None:
        raise TemplateError(f"{name}: the tokenizer has no chat template; set tokenizer.chat_template")
    stops = stop_ids(tokenizer) if stops is None else stops
    if not stops:
        raise TemplateError(f"{name}: the tokenizer has no end-of-sequence or end-of-turn token; set its eos_token")
    try:
        assistant_mask(tokenizer, probe, stops)
    except TemplateError as exc:
        raise TemplateError(f"{name}: {exc}") from None
