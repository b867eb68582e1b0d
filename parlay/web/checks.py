"""A study's agents checked before anything of the study is stored (``parlay study tokens`` and
``parlay serve`` call ``check_agents`` first): every condition's spec is parsed, bots looked up,
``run:`` rounds resolved, ``proxy:`` folders' manifests and models looked for, local model and
adapter folders looked for. Weights are not loaded; what
cannot be checked without loading (a hub id, an endpoint) is said so in the notes."""

from __future__ import annotations

from pathlib import Path

from parlay.agents.models import EMBEDDED
from parlay.agents.scripted import BOTS
from parlay.config import ConfigError
from parlay.proxy import ProxyDir, ProxyError
from parlay.web.study import Study

KINDS = ("bot:", "hf:", "run:", "proxy:", "openai:", "vllm:")


def check_agents(study: Study) -> list[str]:
    """One note per distinct agent of the study saying what was checked; a ``ConfigError`` naming
    every condition whose agent is wrong (nothing is stored by this)."""
    notes, problems = [], []
    for spec in sorted({c.agent for c in study.conditions}):
        names = ", ".join(c.name for c in study.conditions if c.agent == spec)
        try:
            notes.append(f"{spec}: {_check(spec)}")
        except ValueError as exc:
            problems.append(f"condition {names}: agent {spec!r}: {exc}")
    if problems:
        raise ConfigError("the study's agents cannot play; nothing was stored: " + "; ".join(problems))
    return notes


def _check(spec: str) -> str:
    if spec == "human":
        raise ValueError("'human' cannot be a study's partner: the participants are the humans")
    kind = next((k for k in KINDS if spec.startswith(k)), None)
    if kind is None:
        raise ValueError(f"unknown kind of agent (expected one of {', '.join(KINDS)})")
    rest = spec.removeprefix(kind)
    if kind == "bot:":
        if rest not in BOTS:
            raise ValueError(f"no bot named {rest!r} (known: {', '.join(sorted(BOTS))})")
        return "bot found"
    if kind == "run:":
        folder = Path(rest.rsplit("@", 1)[0]).expanduser()
        if not (folder / "config.yaml").is_file():
            raise ValueError(f"run folder {folder}: no config.yaml there")
        return "run folder found (its round is resolved when loaded)"
    if kind == "proxy:":
        try:
            ProxyDir(rest).playable()
        except ProxyError as exc:
            raise ValueError(str(exc)) from None
        return "proxy folder found: manifest and model (weights not loaded)"
    if kind == "hf:":
        model, *options = rest.split("+")
        for option in options:
            key, _, value = option.partition("=")
            if key == "adapter" and not (Path(value).expanduser() / "adapter_config.json").is_file():
                raise ValueError(f"adapter {value}: no adapter_config.json there")
        if model in EMBEDDED:
            return "the embedded model (weights not loaded)"
        path = Path(model).expanduser()
        if path.exists():
            if not (path / "config.json").is_file() and not list(path.glob("*.gguf")):
                raise ValueError(f"model folder {path}: no config.json (nor a .gguf file) there")
            return "model files found (weights not loaded)"
        if model.startswith(("/", "./", "../", "~")):
            raise ValueError(f"model folder {model}: no such folder")
        return "a hub id: not checked without loading"
    return "an endpoint or engine: not checked without loading"
