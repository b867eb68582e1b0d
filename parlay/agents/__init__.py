"""Agents: everything that can take a turn, named by typed specs (``parlay/specs.py``).

- ``bot:NAME`` — a rule-based bot (``hard``, ``conceder``, ``cooperative``, ``random``);
- ``hf:MODEL`` — a transformers model: ``smollm2-135m`` (the embedded default), a hub id or a
  local path, with options after ``+``: ``hf:smollm2-135m+adapter=runs/x/rounds/1/model+dtype=bf16``
  (``adapter``, ``dtype``, ``device``, ``reuse=0`` to turn prefix reuse off, ``share=0`` to compute
  the prompts' common head per conversation instead of once, ``batch`` for the most
  conversations decoded together, ``select=1`` for the selection step: every proposal's counts
  chosen, not sampled, ``hf.py``);
- ``openai:MODEL@BASE_URL`` — any OpenAI-compatible endpoint (``openai:gpt-4o-mini`` uses the
  official API and ``$OPENAI_API_KEY``);
- ``vllm:MODEL`` — vLLM's offline engine (``pip install 'parlay[vllm]'``, GPU);
- ``human`` — a person at this terminal;
- ``run:DIR[@K]`` — round K's model of the run in DIR (default: its last complete round;
  ``resolve.py``);
- ``proxy:DIR`` — the human proxy built in DIR (``parlay proxy build``; ``resolve.py``).

``load_agent`` takes a typed spec (or, for callers that still hold one, its text) and gives the
agent, whose ``spec`` is the spec's text (``run:DIR@K`` for a run's round).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from parlay.agents.base import JUDGE_SAMPLING, Agent, AgentError, ModelAgent, Prompt, Reply, Sampling, TurnRequest
from parlay.agents.scripted import BOTS
from parlay.errors import ConfigError
from parlay.run import RunDirError
from parlay.specs import (
    DEFAULT_BATCH,
    DEFAULT_DTYPE,
    KINDS,
    AgentSpec,
    BotSpec,
    HFSpec,
    HumanSpec,
    OpenAISpec,
    ProxySpec,
    RunSpec,
    SpecError,
    VLLMSpec,
    parse_spec,
)


def _typed(spec: AgentSpec | str) -> AgentSpec:
    """A spec's typed value; text that is not a spec is an ``AgentError``, as it always was."""
    if not isinstance(spec, str):
        return spec
    try:
        return parse_spec(spec)
    except SpecError as exc:
        if str(exc).startswith("unknown agent"):
            raise AgentError(f"unknown agent {spec!r}: expected one of {_known()}") from None
        raise AgentError(str(exc)) from None


def _known() -> str:
    return ", ".join(f"bot:{n}" for n in BOTS) + ", " + KINDS.removeprefix("bot:NAME, ")


def load_agent(spec: AgentSpec | str, sampling: Sampling | None = None) -> Agent:
    """The agent ``spec`` names (see the module docstring), sampling with ``sampling`` (model
    agents). ``AgentError``: an unknown bot or kind, a model that cannot be loaded, a missing
    package; ``ConfigError``: a ``run:`` spec whose round is not complete."""
    spec = _typed(spec)
    sampling = sampling or Sampling()
    if isinstance(spec, RunSpec):  # round K's model of a run, named run:DIR@K wherever it plays
        from parlay.agents.resolve import resolve_run

        name, resolved = resolve_run(spec)
        agent = load_agent(resolved, sampling)
        agent.spec = str(name)
        return agent
    if isinstance(spec, ProxySpec):  # a human proxy's model, named proxy:DIR wherever it plays
        from parlay.agents.resolve import resolve_proxy

        agent = load_agent(resolve_proxy(spec), sampling)
        agent.spec = str(spec)
        return agent
    if isinstance(spec, BotSpec) and spec.name in BOTS:
        agent = BOTS[spec.name]()
    elif isinstance(spec, HumanSpec):
        from parlay.agents.human import HumanAgent

        agent = HumanAgent()
    elif isinstance(spec, HFSpec):
        agent = _hf_agent(spec, sampling)
    elif isinstance(spec, OpenAISpec):
        from parlay.agents.openai_compat import OpenAIAgent

        agent = OpenAIAgent(spec.model, spec.base_url, sampling)
    elif isinstance(spec, VLLMSpec):
        from parlay.agents.vllm import VLLMAgent

        agent = VLLMAgent(spec.model, sampling, **dict(spec.options))
    else:
        raise AgentError(f"unknown agent {str(spec)!r}: expected one of {_known()}")
    agent.spec = str(spec)
    return agent


def _hf_agent(spec: HFSpec, sampling: Sampling) -> Agent:
    from parlay.agents.hf import HFAgent, load_model

    model, tokenizer = load_model(spec.model, spec.adapter, spec.dtype or DEFAULT_DTYPE, spec.device)
    return HFAgent(
        model,
        tokenizer,
        sampling,
        prefix_reuse=spec.reuse is not False,
        share_prefix=spec.share is not False,
        max_batch=spec.batch or DEFAULT_BATCH,
        spec=str(spec),
        select=spec.select is True,
    )


def load_agents(specs: Sequence[AgentSpec], sampling: Sampling) -> list[Agent]:
    """Each agent of ``specs`` in order (a tournament's); an ``AgentError`` names the one that
    cannot be loaded, and the ones loaded before it are closed."""
    agents: list[Agent] = []
    try:
        for spec in specs:
            try:
                agents.append(load_agent(spec, sampling))
            except AgentError as exc:
                raise AgentError(f"agent {str(spec)!r}: {exc}") from None
            except (ConfigError, RunDirError):  # a run: spec's round that is not there names itself
                raise
            except Exception as exc:
                why = f"{type(exc).__name__}: {exc}"
                raise AgentError(f"agent {str(spec)!r} could not be loaded: {why}") from None
    except BaseException:
        for agent in agents:
            agent.close()
        raise
    return agents


def load_judge(spec: AgentSpec | str, seed: int = 0) -> Agent:
    """A judge: the model a spec names, sampling as every judge does (``JUDGE_SAMPLING``)."""
    agent = load_agent(spec, replace(JUDGE_SAMPLING, seed=seed))
    if not isinstance(agent, ModelAgent):
        agent.close()
        raise AgentError(f"{str(spec)!r} cannot judge: a judge must be a language model (hf:, openai: or vllm:)")
    return agent


__all__ = [
    "JUDGE_SAMPLING",
    "Agent",
    "AgentError",
    "ModelAgent",
    "Prompt",
    "Reply",
    "Sampling",
    "TurnRequest",
    "load_agent",
    "load_agents",
    "load_judge",
]
