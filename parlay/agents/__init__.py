"""Agents: everything that can take a turn, named by spec strings.

- ``bot:NAME`` — a rule-based bot (``hard``, ``conceder``, ``cooperative``, ``random``);
- ``hf:MODEL`` — a transformers model: ``smollm2-135m`` (the embedded default), a hub id or a
  local path, with options after ``+``: ``hf:smollm2-135m+adapter=runs/x/rounds/1/model+dtype=bf16``
  (``adapter``, ``dtype``, ``device``, ``reuse=0`` to turn prefix reuse off, ``share=0`` to compute
  the prompts' common head per conversation instead of once, ``batch`` for the most
  conversations decoded together);
- ``openai:MODEL@BASE_URL`` — any OpenAI-compatible endpoint (``openai:gpt-4o-mini`` uses the
  official API and ``$OPENAI_API_KEY``);
- ``vllm:MODEL`` — vLLM's offline engine (``pip install 'parlay[vllm]'``, GPU);
- ``human`` — a person at this terminal;
- ``run:DIR[@K]`` — round K's model of the run in DIR (default: its last complete round).
"""

from __future__ import annotations

from dataclasses import replace

from parlay.agents.base import JUDGE_SAMPLING, Agent, AgentError, ModelAgent, Prompt, Reply, Sampling, TurnRequest
from parlay.agents.scripted import BOTS


def parse_options(rest: str) -> tuple[str, dict[str, str]]:
    """'NAME+key=value+key=value' → ('NAME', {key: value})."""
    name, *opts = rest.split("+")
    options = {}
    for opt in opts:
        key, sep, value = opt.partition("=")
        if not sep or not key:
            raise AgentError(f"bad agent option {opt!r}: expected key=value")
        options[key] = value
    return name, options


def load_agent(spec: str, sampling: Sampling | None = None) -> Agent:
    """The agent a spec string names (see the module docstring)."""
    kind, _, rest = spec.partition(":")
    sampling = sampling or Sampling()
    if kind == "run":  # round K's model of a run, named run:DIR@K wherever it plays
        from parlay.run import round_agent_spec

        name, resolved = round_agent_spec(spec)
        agent = load_agent(resolved, sampling)
        agent.spec = name
        return agent
    if kind == "bot" and rest in BOTS:
        agent = BOTS[rest]()
    elif kind == "human" and not rest:
        from parlay.agents.human import HumanAgent

        agent = HumanAgent()
    elif kind == "hf" and rest:
        from parlay.agents.hf import HFAgent, load_model

        name, opts = parse_options(rest)
        unknown = set(opts) - {"adapter", "dtype", "device", "reuse", "share", "batch"}
        if unknown:
            raise AgentError(
                f"unknown option(s) {sorted(unknown)} in {spec!r}: expected adapter, dtype, device, reuse, share, batch"
            )
        batch = opts.get("batch", "64")
        if not batch.isdigit() or int(batch) < 1:
            raise AgentError(f"bad batch size in {spec!r}: expected a positive whole number")
        model, tokenizer = load_model(name, opts.get("adapter"), opts.get("dtype", "auto"), opts.get("device"))
        reuse, share = opts.get("reuse", "1") != "0", opts.get("share", "1") != "0"
        agent = HFAgent(model, tokenizer, sampling, prefix_reuse=reuse, share_prefix=share, max_batch=int(batch))
    elif kind == "openai" and rest:
        from parlay.agents.openai_compat import OpenAIAgent

        model, _, base_url = rest.partition("@")
        agent = OpenAIAgent(model, base_url or None, sampling)
    elif kind == "vllm" and rest:
        from parlay.agents.vllm import VLLMAgent

        name, opts = parse_options(rest)
        agent = VLLMAgent(name, sampling, **opts)
    else:
        known = ", ".join(f"bot:{n}" for n in BOTS)
        raise AgentError(
            f"unknown agent {spec!r}: expected one of {known}, hf:MODEL, openai:MODEL@URL, vllm:MODEL, "
            "run:DIR[@K] or human"
        )
    agent.spec = spec
    return agent


def load_judge(spec: str, seed: int = 0) -> Agent:
    """A judge: the model a spec names, sampling as every judge does (``JUDGE_SAMPLING``)."""
    agent = load_agent(spec, replace(JUDGE_SAMPLING, seed=seed))
    if not isinstance(agent, ModelAgent):
        agent.close()
        raise AgentError(f"{spec!r} cannot judge: a judge must be a language model (hf:, openai: or vllm:)")
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
    "load_judge",
]
