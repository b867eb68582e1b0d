"""A human-proxy folder: a partner cloned from people's games, with the record of what it learned.

A human proxy (Carroll et al. 2019, "On the utility of learning about humans for human-AI
coordination": a behaviour-cloned model of people's play stands in for them offline; Lewis et
al. 2017 trained their RL negotiators against a model supervised on the human dialogues) is a
model fine-tuned by behaviour cloning on games people played (``improve/proxy.py`` builds it,
``evaluate/proxy.py`` checks it). Its folder holds::

    DIR/proxy.json        the manifest (``ProxyManifest``): what it was trained on and how
    DIR/model/            the adapter (or, with ``train.lora: false``, the full weights)
    DIR/warm_start/       the built-in warm start's games and model, when it had one
    DIR/check.json        the last ``parlay proxy check`` (``ProxyCheck``) played with the proxy's
                          own proposal setting, when there is one (one with the other setting:
                          ``check_sampled.json`` or ``check_selected.json``, ``ProxyDir.check_stem``)

The agent spec ``proxy:DIR`` names it (``specs.ProxySpec``); ``agents/resolve.py`` turns it
into the model agent that plays it. A folder without ``proxy.json`` is not a proxy
(``ProxyError``), and one whose last check found most of its replies rejected by the protocol
is refused as a partner until it is rebuilt (``ProxyDir.playable``).
"""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from parlay.errors import UserError
from parlay.files import write_lines_atomic
from parlay.run import ModelRef

MANIFEST = "proxy.json"
CHECK = "check.json"
MIN_ACCEPTED = 0.5
"""A proxy whose replies the protocol accepts on fewer than this share of its attempts (in its
check's games) rejects on most turns: it is refused as a partner."""


class ProxyError(UserError):
    """A folder that is not a usable proxy; the message names the folder and what to do."""


class _Record(BaseModel):
    model_config = ConfigDict(extra="ignore")


class ProxyManifest(_Record):
    """What a proxy learned from and how (``DIR/proxy.json``)."""

    kind: Literal["parlay-proxy"] = "parlay-proxy"
    schema_version: int = 1
    episodes: str
    """The human games' file, as given."""
    episodes_sha256: str
    """SHA-256 of that file's bytes."""
    games: int
    """Games in the file."""
    agreed_games: int
    """Of those, games with a valid deal."""
    sides: str
    """The seats imitated: ``AB`` (both people of a human–human game) or ``A``/``B``."""
    keep: str
    """Which games' sides were learned from: ``all`` or ``agreed`` (a filter rule)."""
    examples: int
    """Player-episodes trained on (sides with turns of their own)."""
    side_counts: dict[str, int] = {}
    """Of those, how many sat in seat A and in seat B."""
    objectives: list[dict[str, Any]]
    """The objectives the people played under (``{"name", "lam"}``), each once."""
    base: str
    """The base model (name, hub id or path)."""
    init: str | None = None
    """The ``--init`` given (``run:DIR@K`` or an adapter folder), None when none was."""
    start: ModelRef
    """The model behaviour cloning started from (after the warm start, when there was one)."""
    warm_start: dict[str, Any] | None = None
    """The built-in warm start (``warm_start`` config: bots, games, epochs, lr), None without."""
    lora: bool = True
    epochs: float
    lr: float
    seed: int
    parlay_version: str
    parlay_commit: str | None = None
    """The source's git commit, None when parlay was not run from a git checkout."""
    train_stats: dict[str, Any] = {}
    """The trainer's summary (steps, examples, own tokens, first and last loss)."""
    select: bool = True
    """Whether it plays with the selection step (``agents/hf.py``): each proposal's counts chosen
    from the dialogue (the split last stated in words, else the model's likeliest legal split), as
    people enter theirs on a selection screen; False: sampled as text. A manifest written before
    this setting existed plays with it."""


class ProxyCheck(_Record):
    """How human-like a proxy is on human games it never saw (``evaluate/proxy.py``)."""

    episodes: str
    episodes_sha256: str
    games: int
    """Held human games."""
    sides: str
    human_turns: int
    """The imitated sides' accepted turns in the held games (messages and proposals)."""
    human_tokens: int
    """Their tokens under the proxy's tokenizer (end-of-turn tokens included)."""
    loglik_proxy: float
    """Mean log-likelihood per token of those turns under the proxy (nats; closer to 0: likelier)."""
    loglik_base: float
    """The same under the base model without the proxy's training (the contrast)."""
    loglik_turn_proxy: float
    """Mean over turns of each turn's mean log-likelihood per token, under the proxy (nats)."""
    loglik_turn_base: float
    human_agreement: float
    """Share of the held games with a valid deal, as the people played them."""
    human_reward: float
    """Mean reward per player in the held games, as the people played them."""
    proxy_games: int
    """Games the proxy played with itself on the held games' contexts and first speakers."""
    proxy_agreement: float
    proxy_reward: float
    attempts: int
    """The proxy's replies in those games (rejected attempts included)."""
    accepted: int
    """Of those, the replies the protocol accepted."""
    acceptance: float
    """accepted / attempts."""
    max_messages: int | None
    seed: int
    close_games: int | None = None
    """The held games the people agreed in, which the proxy carried on from their messages
    (None in a check written before this figure existed)."""
    close_agreement: float | None = None
    """Share of those the proxy, with itself, brought to a deal within ``close_messages`` more messages."""
    close_same_split: float | None = None
    """Share of those whose deal was the people's own split."""
    close_messages: int | None = None
    select: bool | None = None
    """Whether the proxy played with the selection step (None in a check written before it existed)."""


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def source_commit() -> str | None:
    """The git commit of parlay's source folder (a ``+`` marks uncommitted changes), or None."""
    here = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "."], cwd=here, capture_output=True, text=True)
        return head.stdout.strip() + ("+" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


class ProxyDir:
    """A proxy's folder: every path, the manifest and the last check."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path).expanduser()
        self.manifest_file = self.path / MANIFEST
        self.check_file = self.path / CHECK
        self.model = self.path / "model"
        self.warm_start = self.path / "warm_start"

    def manifest(self) -> ProxyManifest:
        """The manifest; ``ProxyError`` when the folder holds none or an unreadable one."""
        if not self.manifest_file.is_file():
            raise ProxyError(
                f"{self.path}: not a proxy folder (no {MANIFEST}); build one with "
                f"`parlay proxy build --episodes HUMAN.jsonl --out {self.path}`"
            )
        try:
            return ProxyManifest.model_validate_json(self.manifest_file.read_text(encoding="utf-8"))
        except (ValidationError, ValueError, OSError) as exc:
            raise ProxyError(f"{self.manifest_file}: not a proxy manifest ({exc}); rebuild the proxy") from None

    def write_manifest(self, manifest: ProxyManifest) -> None:
        write_lines_atomic(self.manifest_file, [manifest.model_dump_json(indent=1)])

    def model_ref(self) -> ModelRef:
        """The proxy's model: its adapter on the manifest's base (or its own full weights).
        ``ProxyError`` when the folder is not a proxy or its model is missing."""
        m = self.manifest()
        found = (self.model / "adapter_config.json") if m.lora else (self.model / "config.json")
        if not found.is_file():
            raise ProxyError(f"{self.path}: the proxy's model is missing ({found}); rebuild the proxy")
        return ModelRef(base=m.base, adapter=str(self.model)) if m.lora else ModelRef(base=str(self.model))

    def last_check(self) -> ProxyCheck | None:
        if not self.check_file.is_file():
            return None
        try:
            return ProxyCheck.model_validate_json(self.check_file.read_text(encoding="utf-8"))
        except (ValidationError, ValueError, OSError):
            return None

    def check_stem(self, select: bool) -> str:
        """The file stem of a check played with ``select``: ``check`` when that is the proxy's own
        setting (``ProxyManifest.select``: the check that can refuse it), else ``check_selected``
        or ``check_sampled``, kept apart so that comparing the two never replaces it."""
        if select == self.manifest().select:
            return self.check_file.stem
        return "check_selected" if select else "check_sampled"

    def own_setting(self, check: ProxyCheck) -> bool:
        """Whether ``check`` was played with the proposal setting the proxy plays with (a check
        written before the setting was recorded counts as such): only such a check can refuse it."""
        return check.select is None or check.select == self.manifest().select

    def write_check(self, check: ProxyCheck) -> Path:
        """Write ``check`` as ``DIR/<check_stem>.json``; returns that path."""
        played = self.manifest().select if check.select is None else check.select
        path = self.path / f"{self.check_stem(played)}.json"
        write_lines_atomic(path, [check.model_dump_json(indent=1)])
        return path

    def playable(self) -> ModelRef:
        """``model_ref``, refused (``ProxyError``) when the last check, played with the proposal
        setting the proxy plays with (``ProxyManifest.select``), found the protocol rejecting most
        of the proxy's replies: such a partner would abort most games."""
        ref = self.model_ref()
        check = self.last_check()
        if check is not None and self.own_setting(check) and check.acceptance < MIN_ACCEPTED:
            raise ProxyError(
                f"{self.path}: the protocol rejected {1 - check.acceptance:.0%} of this proxy's replies in its "
                f"check ({self.check_file}); rebuild it from a model that knows the protocol (--init run:DIR@0, "
                "or the default warm start) or with more epochs"
            )
        return ref
