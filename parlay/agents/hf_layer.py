"""The one Hugging Face layer: what the decoder (``hf.py``) and the trainer (``improve/sft.py``)
must agree on, written once.

- ``load``: a model name, hub id or path (``models.resolve``) with its tokenizer, in a dtype, on a
  device, with a LoRA adapter merged in (play) or left trainable (training);
- ``render``: a conversation as token ids through the tokenizer's own chat template;
- ``assistant_mask``: which of those ids are the player's own turns (the training loss's mask);
- ``stop_ids``: the tokens that end a reply, read from the tokenizer, the generation config and
  the chat template itself (the token the template writes after an assistant turn), never a
  template-specific string.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

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
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


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
    ``generation_prompt`` the ids end where the assistant starts writing."""
    ids = tokenizer.apply_chat_template(
        list(messages), add_generation_prompt=generation_prompt, tokenize=True, return_dict=False
    )
    if not isinstance(ids, list):  # some tokenizers return a BatchEncoding whatever is asked
        ids = ids["input_ids"]
    return list(ids)


def end_of_turn_id(tokenizer) -> int | None:
    """The special token the chat template writes right after an assistant turn's content
    (``<|im_end|>`` for ChatML, ``<|eot_id|>`` for Llama 3), or None if it writes none."""
    probe: list[ChatMessage] = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    try:
        start = len(render(tokenizer, probe[:1], generation_prompt=True))
        full = render(tokenizer, probe, generation_prompt=False)
    except Exception:  # no chat template, or one that needs other roles
        return None
    special = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
    return next((t for t in full[start:] if t in special), None)


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
    """(input_ids, mask) of a whole conversation; mask is 1 exactly on the tokens of each assistant
    turn's content and the end-of-turn token that closes it.

    Spans are found by rendering the conversation up to each assistant turn with the generation
    prompt (where the assistant starts writing) and up to its end; the chat template must render
    every prefix of a conversation as a prefix of the whole, which is checked."""
    stops = stop_ids(tokenizer) if stops is None else stops
    ids = render(tokenizer, messages, generation_prompt=False)
    mask = [0] * len(ids)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = len(render(tokenizer, messages[:i], generation_prompt=True))
        upto = render(tokenizer, messages[: i + 1], generation_prompt=False)
        if ids[: len(upto)] != upto or len(upto) <= start:
            raise TemplateError("the chat template does not render a conversation's prefixes as prefixes")
        end = len(upto)
        for j in range(start, end):
            if ids[j] in stops:
                end = j + 1
                break
        mask[start:end] = [1] * (end - start)
    return ids, mask
