"""Which agent a spec that names a recorded model stands for: ``run:DIR@K``, a round's
``ModelRef``, a human proxy's ``proxy:DIR``.

A run's records (``parlay/run.py``) say which model each round played and with which rollout
settings; this module turns that into the agent spec that plays it (``specs.model_spec``), so
the records never build agents and the agents never spell a run's paths.
"""

from __future__ import annotations

from parlay.config import RolloutConfig
from parlay.proxy import ProxyDir
from parlay.run import ModelRef, RunDir
from parlay.seeds import SeedRuns, ask_for_seed
from parlay.specs import DEFAULT_BATCH, DEFAULT_DTYPE, AgentSpec, ProxySpec, RunSpec, SpecError, model_spec


def model_agent(model: ModelRef, rollout: RolloutConfig) -> AgentSpec:
    """The agent that plays ``model`` with ``rollout``'s dtype, batch and backend (a setting at
    its default is left out of the spec). ``SpecError``: vLLM asked to play an adapter."""
    return model_spec(model.base, model.adapter, rollout.dtype, rollout.batch, rollout.backend)


def resolve_run(spec: RunSpec) -> tuple[RunSpec, AgentSpec]:
    """``run:DIR[@K]`` → (``run:DIR@K`` with K resolved, the agent of round K's model, played
    with that run's rollout settings). K defaults to the last complete round. ``ConfigError``
    (a ``UserError``): no complete round, K not complete, or ``@all`` (``expand_rounds`` first)."""
    if spec.round == "all":
        raise SpecError(f"{spec}: @all stands for several agents; only a tournament takes it")
    if (seeds := SeedRuns.find(spec.path)) is not None:
        raise ask_for_seed(spec, seeds, f"name one seed's model: run:{spec.path}/seed-<s>@K")
    run = RunDir(spec.path)
    k, model = run.round_model(spec, spec.round)
    return RunSpec(spec.path, k), model_agent(model, run.load_config().rollout)


def resolve_proxy(spec: ProxySpec) -> AgentSpec:
    """``proxy:DIR`` → the agent of the proxy's model (its adapter on the manifest's base model,
    played with the default dtype and batch, and with the selection step unless its manifest
    turns it off). ``ProxyError`` (a ``UserError``): DIR is not a
    proxy, its model is missing, or its last check found most of its replies rejected."""
    proxy = ProxyDir(spec.path)
    model = proxy.playable()
    return model_spec(model.base, model.adapter, DEFAULT_DTYPE, DEFAULT_BATCH, "hf", select=proxy.manifest().select)


def expand_rounds(spec: AgentSpec) -> list[AgentSpec]:
    """``run:DIR@all`` → ``run:DIR@0``, ``run:DIR@1``, … (every complete round); any other spec alone.
    A run over seeds (``parlay/seeds.py``) stands for every seed's run: ``run:RUN@K`` →
    ``run:RUN/seed-<s>@K`` for each seed present, in order. ``ConfigError`` when a run has no
    complete round."""
    if not isinstance(spec, RunSpec):
        return [spec]
    if (seeds := SeedRuns.find(spec.path)) is not None:
        seeds.check()
        paths = [str(seeds.run(s).path) for s in seeds.present_seeds()]
        return [one for path in paths for one in expand_rounds(RunSpec(path, spec.round))]
    if spec.round != "all":
        return [spec]
    return [RunSpec(spec.path, k) for k in RunDir(spec.path).complete_rounds_of(spec)]
