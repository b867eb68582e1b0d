"""Run configuration: pydantic models loaded from YAML, overridable from the command line.

Every field carries its help text. Unknown keys and wrong types are errors that name the key
(``rollout.gamez: unknown key``). ``load_config`` reads a YAML file and applies ``key=value``
overrides (``--set rollout.games=32``); the resolved config is saved with every run. Agent
specs are typed here, where they enter (``AgentSpecField``, ``PartnerField``: parsed from text,
saved as text; ``parlay/specs.py``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainSerializer,
    PlainValidator,
    StrictInt,
    ValidationError,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from parlay.errors import ConfigError  # its home; `from parlay.config import ConfigError` still works
from parlay.games.dond import DEFAULT_MAX_MESSAGES, MAX_REPLY_CHARS, RuleError, objective
from parlay.specs import (
    DEFAULT_BATCH,
    DEFAULT_DTYPE,
    AgentSpec,
    Partner,
    SelfPartner,
    parse_partner,
    parse_spec,
)


def _typed(parse):
    def validate(value: Any) -> Any:
        if isinstance(value, str):
            return parse(value)  # a SpecError is a ValueError: pydantic names the key
        if value is None or isinstance(value, str | int | float | list | dict):
            raise ValueError(f"expected an agent spec (text), got {type(value).__name__}")
        return parse(str(value))  # a typed spec: checked as its text is

    return validate


AgentSpecField = Annotated[
    AgentSpec,
    PlainValidator(_typed(parse_spec)),
    PlainSerializer(str, return_type=str),
    WithJsonSchema({"type": "string"}),
]
"""A config key that holds an agent spec: text in YAML, a typed spec in code."""
PartnerField = Annotated[
    Partner,
    PlainValidator(_typed(parse_partner)),
    PlainSerializer(str, return_type=str),
    WithJsonSchema({"type": "string"}),
]
"""A config key that holds a round's partner: ``self``, ``checkpoint:PICK`` or an agent spec."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RolloutConfig(_Section):
    games: int = Field(64, ge=1, description="Self-play games per round.")
    max_messages: int = Field(DEFAULT_MAX_MESSAGES, ge=1, description="Messages before a game ends without a deal.")
    max_reply_chars: int = Field(
        MAX_REPLY_CHARS, ge=1, description="Longest reply in characters; a longer one is rejected and kept only cut."
    )
    temperature: float = Field(0.8, ge=0.0, description="Sampling temperature (0 = greedy).")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling mass.")
    max_new_tokens: int = Field(48, ge=1, description="Longest reply, in tokens.")
    contexts: Literal["same", "fresh"] = Field(
        "same",
        description="'same': every round replays the same seeded games, so rounds compare pairwise; "
        "'fresh': each round draws new contexts.",
    )
    group_size: int = Field(
        1,
        ge=1,
        description="Games played on each context (with their own first speakers and sampling seeds): a group "
        "whose mean is the baseline of weights.rl.baseline: group.",
    )
    batch: int = Field(DEFAULT_BATCH, ge=1, description="Most conversations decoded together (transformers backend).")
    backend: Literal["hf", "vllm"] = Field(
        "hf",
        description="Who plays the model's turns: hf (transformers, CPU or GPU) or vllm (GPU, pip install "
        "'parlay[vllm]'; plays full weights, so it needs train.lora: false).",
    )
    dtype: str = Field(
        DEFAULT_DTYPE,
        description="Rollout dtype: auto (bf16 on GPU and on CPUs with native bf16, else fp32), float32, bf16.",
    )
    workers: int = Field(
        0,
        ge=0,
        description="Ray actors that play the games, each loading its own agents (0: play in this process). "
        "Needs pip install 'parlay[ray]'.",
    )
    ray_address: str | None = Field(
        None, description="Address of a running Ray cluster (default: start a local Ray instance with `workers` CPUs)."
    )


FilterRule = Literal["above_mean", "nonzero", "agreed", "all", "top_fraction", "threshold"]


class FilterConfig(_Section):
    rule: FilterRule = Field(
        "above_mean",
        description="Which player-episodes to learn from: reward above the baseline (the paper), reward "
        "above zero, sides of valid deals, all, the top fraction, or reward at least a threshold.",
    )
    fraction: float = Field(0.5, gt=0.0, le=1.0, description="Share kept by top_fraction.")
    threshold: float = Field(0.0, description="Least reward kept by threshold.")
    keep_valid_ties: bool = Field(
        False, description="Also keep valid deals whose reward is 0 (the paper's competitive variant)."
    )
    baseline: Literal["round", "context"] = Field(
        "round", description="Mean that above_mean and awr compare with: the round's, or the same context's."
    )
    on_empty: Literal["skip", "nonzero"] = Field(
        "skip", description="When nothing passes: skip this round's training, or fall back to nonzero."
    )


class JudgeConfig(_Section):
    agent: AgentSpecField | None = Field(None, description="Agent spec of the judge that rates player-episodes 0-10.")
    mode: Literal["filter", "weight"] = Field(
        "weight", description="Use the rating to filter (rating >= min_rating) or as the weight."
    )
    min_rating: float = Field(6.0, ge=0.0, le=10.0, description="Least rating kept when mode is filter.")


class RLConfig(_Section):
    baseline: Literal["group", "role"] = Field(
        "group",
        description="What a side's reward is compared with: group, the mean of the other sides of the same "
        "role (first or second speaker) on the same context in the round (needs rollout.group_size >= 2); "
        "role, the mean of the other sides of the same role in the round.",
    )
    scale: Literal["std", "none"] = Field("std", description="Divide the advantages by their standard deviation.")
    clip: float = Field(
        0.2, gt=0.0, lt=1.0, description="PPO clip range of the per-token ratio to the round-start model."
    )
    kl: float = Field(
        0.05, ge=0.0, description="Weight of the per-token KL anchor to the round-start model (keeps text fluent)."
    )


class WeightConfig(_Section):
    scheme: Literal["uniform", "awr", "iw_sft", "judge", "rl"] = Field(
        "uniform",
        description="uniform; awr: exp((R - b)/beta) clipped; iw_sft: importance weight against the "
        "frozen round-start model, recomputed as training goes; judge: an agent's 0-10 rating; rl: online "
        "policy gradient with advantage R - baseline, negative advantages included (weights.rl).",
    )
    beta: float = Field(1.0, gt=0.0, description="AWR temperature, in reward points.")
    w_max: float = Field(5.0, gt=0.0, description="Largest weight (awr, iw_sft).")
    iw_temperature: float = Field(1.0, gt=0.0, description="T in exp(T * mean log-ratio) of iw_sft.")
    judge: JudgeConfig = Field(default_factory=JudgeConfig, description="Judge settings (scheme: judge).")
    rl: RLConfig = Field(default_factory=RLConfig, description="Policy-gradient settings (scheme: rl).")


class TrainConfig(_Section):
    backend: Literal["hf", "openai"] = Field(
        "hf", description="hf: train here with transformers; openai: an OpenAI fine-tuning job."
    )
    lora: bool = Field(True, description="Train a LoRA adapter; false fine-tunes every weight.")
    lora_r: int = Field(16, ge=1, description="LoRA rank.")
    lora_alpha: int = Field(32, ge=1, description="LoRA alpha.")
    lora_dropout: float = Field(0.0, ge=0.0, lt=1.0, description="LoRA dropout.")
    target_modules: str | list[str] = Field("all-linear", description="Modules LoRA adapts.")
    lr: float = Field(2e-4, gt=0.0, description="Peak learning rate.")
    warmup_steps: int = Field(2, ge=0, description="Linear warm-up steps.")
    epochs: float = Field(1.0, gt=0.0, description="Passes over the kept examples (fractions allowed).")
    min_steps: int = Field(
        0, ge=0, description="Least optimiser steps, repeating the data: a round that kept few examples still learns."
    )
    batch_size: int = Field(4, ge=1, description="Examples per micro-batch.")
    grad_accum: int = Field(2, ge=1, description="Micro-batches per optimiser step.")
    micro_batch_tokens: Annotated[StrictInt, Field(ge=16)] | Literal["auto"] | None = Field(
        "auto",
        description="At most this many padded positions (rows × the longest row) per micro-batch: a micro-batch "
        "of long examples is cut into smaller ones, which bounds the activations kept for the backward pass. "
        "The step's examples and gradient stay the same (accumulation is exact; with lora_dropout > 0, or a model "
        "whose own dropout is on, other dropout masks are drawn). auto: 1024 where the compute dtype is 16-bit, "
        "512 in float32 (the same bytes of activations); null: batch_size rows always. A resumed run may change it.",
    )
    max_length: int = Field(1024, ge=16, description="Longer examples are cut to this many tokens.")
    max_grad_norm: float | None = Field(
        1.0,
        gt=0.0,
        description="Clip each optimiser step's gradient to this global L2 norm (null: never clip). The norm "
        "before clipping is recorded per step either way (TrainStats.grad_norms, the report's Training table).",
    )
    checkpoint_steps: int = Field(
        0,
        ge=0,
        description="Every this many optimiser steps, save what training needs to go on (trainable weights, "
        "optimiser, scheduler, RNG, data position) beside the output; a killed training resumes from it "
        "(0: never).",
    )
    dtype: str = Field(
        "auto", description="Training dtype: auto (bf16 on GPU and on CPUs with native bf16, else fp32), float32, bf16."
    )
    launcher: Literal["inline", "accelerate"] = Field(
        "inline", description="inline: train in this process; accelerate: run `accelerate launch -m parlay sft`."
    )
    accelerate_args: list[str] = Field(default_factory=list, description="Extra `accelerate launch` arguments.")
    openai_base_model: str | None = Field(None, description="Model id to fine-tune (backend: openai).")
    poll_seconds: float = Field(30.0, gt=0.0, description="How often to poll an OpenAI job.")

    @field_validator("micro_batch_tokens", mode="before")
    @classmethod
    def _budget(cls, value: Any) -> Any:
        if value is None or value == "auto" or (type(value) is int and value >= 16):
            return value
        raise ValueError(f"expected auto, null or a whole number of positions ≥ 16, not {value!r}")


class WarmStartConfig(_Section):
    episodes: str | None = Field(None, description="Episodes JSONL to fine-tune on before round 0.")
    bots: list[AgentSpecField] | None = Field(
        None, description="Or: two bot specs whose games are played first and used (the demonstrators)."
    )
    games: int = Field(128, ge=1, description="Bot games to play when bots are given.")
    filter: FilterConfig = Field(
        default_factory=lambda: FilterConfig(rule="agreed"),
        description="Which demonstration sides to keep: any filter rule (default: sides of valid deals). "
        "A rule name alone is short for {rule: NAME}.",
    )
    epochs: float = Field(1.0, gt=0.0, description="Passes over the demonstrations.")
    lr: float | None = Field(None, gt=0.0, description="Learning rate (default: train.lr).")

    @field_validator("filter", mode="before")
    @classmethod
    def _rule_name(cls, value: Any) -> Any:
        return {"rule": value} if isinstance(value, str) else value

    @field_validator("bots")
    @classmethod
    def _two_bots(cls, bots: list[AgentSpec] | None) -> list[AgentSpec] | None:
        if bots is not None and len(bots) != 2:
            raise ValueError("give exactly two agent specs, for players A and B")
        return bots

    @property
    def enabled(self) -> bool:
        return bool(self.episodes or self.bots)


class PartnerConfig(_Section):
    agent: PartnerField = Field(
        description="Who the trained model plays: 'self' (itself, both sides trained on); "
        "'checkpoint:latest', 'checkpoint:uniform' or 'checkpoint:prioritised' (an earlier round's model of "
        "this run: the last one, one drawn uniformly per game, or drawn by how poorly the current model "
        "did with it); or any agent spec (bot:…, hf:…, openai:…, run:DIR@K)."
    )
    share: float = Field(gt=0.0, le=1.0, description="Share of the round's games played with this partner.")


class HeldoutConfig(_Section):
    partners: list[PartnerField] = Field(
        default_factory=list,
        description="Evaluation partners (agent specs) that are not training partners: every round's model "
        "plays the same seeded games with each; records and reports show reward and agreement against each.",
    )
    games: int = Field(32, ge=1, description="Games per held-out partner per round.")


class EarlyStopConfig(_Section):
    patience: int | None = Field(
        None, ge=1, description="Stop after this many rounds without a better mean reward (none: never)."
    )
    min_delta: float = Field(0.0, ge=0.0, description="Improvement that counts as better.")


class RunConfig(_Section):
    name: str = Field("run", description="Run name; the run lives in runs_dir/name.")
    runs_dir: str = Field("runs", description="Folder that holds runs.")
    model: str = Field(
        "smollm2-135m",
        description="Starting model: smollm2-135m (embedded), a hub id or local path, or openai:MODEL[@URL].",
    )
    adapter: str | None = Field(
        None, description="LoRA adapter to start from, e.g. another run's warm_start/model (hf models only)."
    )
    objective: str | float = Field("semi-competitive", description="cooperative, semi-competitive, competitive or λ.")
    seed: int = Field(0, ge=0, description="Seed of contexts, first speakers, sampling and training order.")
    seeds: list[Annotated[StrictInt, Field(ge=0)]] | None = Field(
        None,
        description="Run the same config once per seed (e.g. [0, 1, 2]), one after another, each into "
        "runs_dir/name/seed-<s>/ as a run of its own with seed: s; reports read them as one, with intervals "
        "over seeds and games (parlay/seeds.py). Unset: one run with `seed`.",
    )
    rounds: int = Field(3, ge=0, description="Training rounds after round 0.")
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    partners: list[PartnerConfig] = Field(
        default_factory=lambda: [PartnerConfig(agent=SelfPartner(), share=1.0)],
        description="The round's partners and their shares of its games (default: self-play only).",
    )
    heldout: HeldoutConfig = Field(default_factory=HeldoutConfig)
    filter: FilterConfig = Field(default_factory=FilterConfig)
    weights: WeightConfig = Field(default_factory=WeightConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    warm_start: WarmStartConfig = Field(default_factory=WarmStartConfig)
    early_stop: EarlyStopConfig = Field(default_factory=EarlyStopConfig)
    tracking: list[Literal["tensorboard", "wandb"]] = Field(
        default_factory=list,
        description="Where else to log rollout/, train/ and eval/ metrics: tensorboard, wandb (WANDB_MODE=offline).",
    )

    @field_validator("objective")
    @classmethod
    def _known_objective(cls, spec: str | float) -> str | float:
        try:
            objective(spec)
        except RuleError as exc:
            raise ValueError(str(exc)) from None
        return spec

    @field_validator("seeds")
    @classmethod
    def _distinct_seeds(cls, seeds: list[int] | None) -> list[int] | None:
        if seeds is None:
            return None
        if not seeds:
            raise ValueError("give at least one seed, e.g. seeds: [0, 1, 2] (or leave it out and set seed)")
        twice = sorted({s for s in seeds if seeds.count(s) > 1})
        if twice:
            raise ValueError(f"seed {', '.join(map(str, twice))} is listed twice; each seed runs once")
        return seeds

    @model_validator(mode="after")
    def _consistent(self) -> RunConfig:
        if self.train.backend == "openai" and not self.model.startswith("openai:"):
            raise ValueError("train.backend: openai needs model: openai:MODEL[@URL]")
        if self.weights.scheme == "judge" and not self.weights.judge.agent:
            raise ValueError("weights.scheme: judge needs weights.judge.agent, e.g. openai:gpt-4o-mini")
        if self.model.startswith("openai:") and self.train.backend != "openai":
            raise ValueError("model openai:… can only be trained with train.backend: openai")
        if self.rollout.backend == "vllm" and (self.train.lora or self.adapter):
            raise ValueError(
                "rollout.backend: vllm plays full weights here: set train.lora: false (and no adapter to start from)"
            )
        if self.weights.scheme == "rl":
            if self.filter.rule != "all":
                raise ValueError("weights.scheme: rl learns from every side, failures included: set filter.rule: all")
            if self.weights.rl.baseline == "group" and self.rollout.group_size < 2:
                raise ValueError(
                    "weights.rl.baseline: group compares games on the same context: set rollout.group_size to 2 "
                    "or more, or use baseline: role"
                )
        self._check_partners()
        return self

    def _check_partners(self) -> None:
        names = [p.agent for p in self.partners]
        total = sum(p.share for p in self.partners)
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"partners: the shares add up to {total:g}, not 1")
        if len(set(names)) != len(names):
            raise ValueError(f"partners: a partner is listed twice ({', '.join(map(str, names))})")
        trained_with = set(names) | set(self.warm_start.bots or [])
        for spec in self.heldout.partners:
            if spec in trained_with or not isinstance(spec, AgentSpec):  # self, checkpoint:…
                raise ValueError(
                    f"heldout.partners: {spec} is also a training partner (partners or warm_start.bots); "
                    "a held-out partner must be one the model never trained with or on"
                )
        if len(set(self.heldout.partners)) != len(self.heldout.partners):
            raise ValueError("heldout.partners: a partner is listed twice")

    @property
    def run_dir(self) -> Path:
        return Path(self.runs_dir) / self.name

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def _describe(exc: ValidationError, source: str) -> str:
    problems = []
    for e in exc.errors():
        key = ".".join(str(p) for p in e["loc"])
        msg = "unknown key" if e["type"] == "extra_forbidden" else e["msg"].removeprefix("Value error, ")
        problems.append(f"{key}: {msg}" if key else msg)  # a check across keys names its keys itself
    return f"{source}: " + "; ".join(problems)


def _set(data: dict[str, Any], dotted: str, raw: str) -> None:
    keys = dotted.split(".")
    node = data
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted}: {k} is not a section")
    node[keys[-1]] = yaml.safe_load(raw)


def parse_config(data: Any, source: str = "config", overrides: list[str] | None = None) -> RunConfig:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of keys to values, got {type(data).__name__}")
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected key=value, e.g. rollout.games=32")
        _set(data, key.strip(), value)
    try:
        return RunConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, source)) from None


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """The config in ``path`` (or the defaults) with ``key=value`` overrides applied."""
    if path is None:
        return parse_config({}, "defaults", overrides)
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    return parse_config(data, str(path), overrides)
