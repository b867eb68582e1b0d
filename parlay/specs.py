"""Agent specs: who takes a turn, as a typed value parsed once where it enters.

A spec enters as text — a config key, a command-line option, a study file — and is parsed
there (``parse_spec``) into one of the types below; the code passes the typed value on, and
``str(spec)`` renders it back only for records (episodes' ``meta.agents``, a tournament's
``setup.json``, a run's ``config.yaml``). The text forms:

    bot:NAME                   a rule-based bot (``agents/scripted.py``: hard, conceder, …)
    human                      a person at this terminal
    hf:MODEL[+KEY=VALUE…]      a transformers model (name, hub id or path); options adapter=PATH,
                               dtype=auto|float32|bf16…, device=cpu|cuda…, reuse=0|1 (prefix
                               reuse), share=0|1 (the prompts' common head computed once),
                               batch=N (most conversations decoded together), select=0|1
                               (the selection step: proposals' counts chosen, ``agents/hf.py``)
    openai:MODEL[@BASE_URL]    an OpenAI-compatible endpoint (no URL: the official API)
    vllm:MODEL[+KEY=VALUE…]    vLLM's offline engine; its options go to the engine as they are
    run:DIR[@K|@all]           round K's model of the run in DIR (no K: its last complete round;
                               ``all``: every complete round, where a tournament takes agents)
    proxy:DIR                  the human proxy built in DIR (``parlay proxy build``: a model cloned
                               from people's games; ``parlay/proxy.py``)

A spec parsed from text renders as that text, so a record keeps the user's spelling (and a
resumed tournament finds the setup it saved); a spec built in code (``model_spec``) renders in
the order above, leaving out every option not set. Two specs are equal when they name the same
agent, however spelled. An option not set takes its one default here (``DEFAULT_BATCH``, …)
when the agent is loaded. A text that is not a spec raises ``SpecError`` (a ``UserError``)
naming the text.

A round's partners (``partners:`` of a run config) add two forms that are not agents by
themselves: ``self`` (the trained model) and ``checkpoint:latest|uniform|prioritised`` (an
earlier round's model of the run); ``parse_partner`` reads those and every agent spec.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from parlay.errors import UserError

DEFAULT_BATCH = 64
"""Most conversations an hf agent decodes together (``hf:…+batch=N``, ``rollout.batch``)."""
DEFAULT_DTYPE = "auto"
"""Weights' dtype of a model agent: bf16 on a GPU or a CPU with native bf16, else fp32."""
HF_OPTIONS = ("adapter", "dtype", "device", "reuse", "share", "batch", "select")
CHECKPOINT_PICKS = ("latest", "uniform", "prioritised")


class SpecError(UserError):
    """A text that is not an agent spec (or not a partner); the message quotes it."""


@dataclass(frozen=True)
class _Spec:
    text: str | None = field(default=None, compare=False, repr=False, kw_only=True)
    """The text it was parsed from (rendered back as it is), None when built in code."""

    def __str__(self) -> str:
        return self.text if self.text is not None else self.render()

    def render(self) -> str:
        raise NotImplementedError


@dataclass(frozen=True)
class BotSpec(_Spec):
    name: str

    def render(self) -> str:
        return f"bot:{self.name}"


@dataclass(frozen=True)
class HumanSpec(_Spec):
    def render(self) -> str:
        return "human"


@dataclass(frozen=True)
class HFSpec(_Spec):
    """A transformers model; an option left None takes its default when loaded."""

    model: str
    adapter: str | None = None
    dtype: str | None = None
    """None: ``DEFAULT_DTYPE``."""
    device: str | None = None
    """None: the GPU when there is one, else the CPU."""
    reuse: bool | None = None
    """None: True."""
    share: bool | None = None
    """None: True."""
    batch: int | None = None
    """None: ``DEFAULT_BATCH``."""
    select: bool | None = None
    """None: False (proposals sampled as text, like the rest of the reply)."""

    def render(self) -> str:
        options = [(name, getattr(self, name)) for name in HF_OPTIONS]
        return f"hf:{self.model}" + "".join(f"+{k}={_text(v)}" for k, v in options if v is not None)


@dataclass(frozen=True)
class OpenAISpec(_Spec):
    model: str
    base_url: str | None = None

    def render(self) -> str:
        return f"openai:{self.model}" + (f"@{self.base_url}" if self.base_url else "")


@dataclass(frozen=True)
class VLLMSpec(_Spec):
    model: str
    options: tuple[tuple[str, str], ...] = ()
    """Engine arguments, as written (``dtype`` among them)."""

    def render(self) -> str:
        return f"vllm:{self.model}" + "".join(f"+{k}={v}" for k, v in self.options)


@dataclass(frozen=True)
class RunSpec(_Spec):
    """Round ``round`` of the run in ``path`` (None: its last complete round; "all": every one)."""

    path: str
    round: int | Literal["all"] | None = None

    def render(self) -> str:
        return f"run:{self.path}" + ("" if self.round is None else f"@{self.round}")


@dataclass(frozen=True)
class ProxySpec(_Spec):
    """The human proxy in the folder ``path`` (``parlay/proxy.py``)."""

    path: str

    def render(self) -> str:
        return f"proxy:{self.path}"


AgentSpec = BotSpec | HumanSpec | HFSpec | OpenAISpec | VLLMSpec | RunSpec | ProxySpec


@dataclass(frozen=True)
class SelfPartner(_Spec):
    """The trained model itself (self-play: both sides trained on)."""

    def render(self) -> str:
        return "self"


@dataclass(frozen=True)
class CheckpointPartner(_Spec):
    """An earlier round's model of the run, picked per ``pick`` (``league.py``)."""

    pick: Literal["latest", "uniform", "prioritised"]

    def render(self) -> str:
        return f"checkpoint:{self.pick}"


Partner = SelfPartner | CheckpointPartner | AgentSpec


def _text(value: object) -> str:
    return str(int(value)) if isinstance(value, bool) else str(value)


def _options(text: str, rest: str) -> tuple[str, list[tuple[str, str]]]:
    """'NAME+key=value+key=value' → ('NAME', [(key, value), …])."""
    name, *opts = rest.split("+")
    options = []
    for opt in opts:
        key, sep, value = opt.partition("=")
        if not sep or not key:
            raise SpecError(f"bad agent option {opt!r}: expected key=value")
        options.append((key, value))
    return name, options


def _flag(text: str, key: str, value: str) -> bool:
    if value not in ("0", "1"):
        raise SpecError(f"bad {key} in {text!r}: expected 0 or 1")
    return value == "1"


def _hf(text: str, rest: str) -> HFSpec:
    name, options = _options(text, rest)
    given = dict(options)
    unknown = set(given) - set(HF_OPTIONS)
    if unknown:
        raise SpecError(f"unknown option(s) {sorted(unknown)} in {text!r}: expected {', '.join(HF_OPTIONS)}")
    batch = given.get("batch")
    if batch is not None and (not batch.isdigit() or int(batch) < 1):
        raise SpecError(f"bad batch size in {text!r}: expected a positive whole number")
    return HFSpec(
        name,
        adapter=given.get("adapter"),
        dtype=given.get("dtype"),
        device=given.get("device"),
        reuse=_flag(text, "reuse", given["reuse"]) if "reuse" in given else None,
        share=_flag(text, "share", given["share"]) if "share" in given else None,
        batch=int(batch) if batch is not None else None,
        select=_flag(text, "select", given["select"]) if "select" in given else None,
        text=text,
    )


def _run(text: str, rest: str) -> RunSpec:
    path, at, k = rest.partition("@")
    if at and k != "all" and not k.isdigit():
        raise SpecError(f"{text}: the round after @ must be a whole number (or all)")
    return RunSpec(path, None if not at else "all" if k == "all" else int(k), text=text)


def parse_spec(text: str) -> AgentSpec:
    """The agent ``text`` names (the module docstring's forms); ``SpecError`` when none.

    A bot's name is checked when it is loaded (``agents.load_agent``), not here."""
    kind, _, rest = text.partition(":")
    if kind == "bot" and rest:
        return BotSpec(rest, text=text)
    if text == "human":
        return HumanSpec(text=text)
    if kind == "hf" and rest:
        return _hf(text, rest)
    if kind == "openai" and rest:
        model, _, base_url = rest.partition("@")
        return OpenAISpec(model, base_url or None, text=text)
    if kind == "vllm" and rest:
        name, options = _options(text, rest)
        return VLLMSpec(name, tuple(options), text=text)
    if kind == "run" and rest:
        return _run(text, rest)
    if kind == "proxy" and rest:
        return ProxySpec(rest, text=text)
    raise SpecError(f"unknown agent {text!r}: expected {KINDS}")


KINDS = "bot:NAME, hf:MODEL, openai:MODEL@URL, vllm:MODEL, run:DIR[@K], proxy:DIR or human"


def partner_kind(spec: str) -> str:
    """What kind of partner a spec's text names, for reports: ``bot`` (scripted), ``proxy`` (a
    model cloned from people's games), ``person`` (a human), ``self``, or ``model``."""
    kind = spec.partition(":")[0]
    if kind in ("bot", "proxy", "self"):
        return kind
    return "person" if spec == "human" else "model"


def partner_label(spec: str) -> str:
    """A partner's name in reports: its spec, with its kind added where the text does not already
    say it (``bot:hard`` stays, ``hf:my-model`` → ``hf:my-model (model)``, ``human (person)``)."""
    kind = partner_kind(spec)
    return spec if spec == "self" or spec.startswith(f"{kind}:") else f"{spec} ({kind})"


def parse_partner(text: str) -> Partner:
    """A round's partner: ``self``, ``checkpoint:PICK`` or any agent spec; ``SpecError`` else."""
    if text == "self":
        return SelfPartner(text=text)
    kind, _, pick = text.partition(":")
    if kind == "checkpoint":
        if pick not in CHECKPOINT_PICKS:
            raise SpecError(f"{text!r}: expected checkpoint:{'|'.join(CHECKPOINT_PICKS)}")
        return CheckpointPartner(pick, text=text)  # type: ignore[arg-type]
    return parse_spec(text)


def as_spec(spec: AgentSpec | str) -> AgentSpec:
    """``spec`` itself, or parsed when it is text (for callers that still hold text)."""
    return parse_spec(spec) if isinstance(spec, str) else spec


def model_spec(base: str, adapter: str | None, dtype: str, batch: int, backend: str, select: bool = False) -> AgentSpec:
    """The agent that plays a model (``run.ModelRef``: ``base`` plus an ``adapter``) with a
    run's rollout settings: ``openai:…`` as it is; otherwise the transformers backend, or vLLM
    (full weights only: ``SpecError`` for an adapter). ``select``: the transformers agent's
    selection step (``agents/hf.py``; ``SpecError`` for another backend). A setting at its
    default is left out."""
    if select and (base.startswith("openai:") or backend == "vllm"):
        raise SpecError(f"{base}: the selection step scores replies with a transformers model; play it with hf")
    if base.startswith("openai:"):
        return parse_spec(base)
    chosen_dtype = None if dtype == DEFAULT_DTYPE else dtype
    if backend == "vllm":
        if adapter:
            raise SpecError(f"rollout.backend vllm plays full weights, not the adapter {adapter}")
        return VLLMSpec(base, (("dtype", dtype),) if chosen_dtype else ())
    batch_set = None if batch == DEFAULT_BATCH else batch
    return HFSpec(base, adapter=adapter, dtype=chosen_dtype, batch=batch_set, select=select or None)


def with_round(spec: RunSpec, k: int) -> RunSpec:
    """``run:DIR@K`` for a resolved round (built, so rendered as ``run:DIR@K``)."""
    return RunSpec(spec.path, k)


__all__ = [
    "CHECKPOINT_PICKS",
    "DEFAULT_BATCH",
    "DEFAULT_DTYPE",
    "AgentSpec",
    "BotSpec",
    "CheckpointPartner",
    "HFSpec",
    "HumanSpec",
    "OpenAISpec",
    "Partner",
    "ProxySpec",
    "RunSpec",
    "SelfPartner",
    "SpecError",
    "VLLMSpec",
    "as_spec",
    "model_spec",
    "parse_partner",
    "parse_spec",
    "partner_kind",
]
