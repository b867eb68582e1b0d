"""A run over several seeds: one ordinary run per seed under one parent folder, read as one.

    RUN/seeds.json             the manifest: the seeds and the config they share (all but ``seed``)
    RUN/seed-<s>/              an ordinary run folder (``parlay/run.py``) whose config is RUN's with
                               ``seed: s``, ``name: seed-<s>`` and ``runs_dir: RUN``
    RUN/report.html, plots/    ``parlay report RUN``: every seed's figures and the figures across seeds

A seed folder is exactly what a single run makes with ``--set runs_dir=RUN --set name=seed-<s>
--set seed=<s>``, so every reader of a run reads it (``run:RUN/seed-1@K``, ``parlay report
RUN/seed-1``), and runs made that way by hand are read as a multi-seed run too: a parent folder
is one when it holds ``seed-<int>`` folders with a ``config.yaml`` (``SeedRuns.find``); the
manifest is written by ``parlay train --seeds`` and checked when present. Its seeds' configs
must agree on everything but ``SEED_OWN`` (what each seed sets for itself) and the settings a
resumed run may change (``run.RESUMABLE_CHANGES``); a folder that does not is refused by name.

The layout lives here; ``loop.train_seeds`` runs the seeds one after another and
``evaluate/seeds.py`` computes the figures across them.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from parlay.config import RunConfig
from parlay.errors import ConfigError
from parlay.files import write_lines_atomic
from parlay.run import RESUMABLE_CHANGES, RunDir, _differences, covered

SEED_PREFIX = "seed-"
MANIFEST = "seeds.json"
MANIFEST_VERSION = 1
SEED_OWN = frozenset({"seed", "seeds", "name", "runs_dir"})
"""Config keys in which a seed's run differs from its parent by design."""
_SEED_FOLDER = re.compile(r"seed-(-?\d+)")


def seed_folder(seed: int) -> str:
    """``seed-<s>``: the name of seed ``s``'s run folder."""
    return f"{SEED_PREFIX}{seed}"


def parse_seeds(text: str, option: str = "--seeds") -> list[int]:
    """``"0,1,2"`` → ``[0, 1, 2]``; ``ConfigError`` naming ``option`` for a non-integer, a negative
    number (numpy's generators take none), an empty list or a seed given twice."""
    items = [x.strip() for x in text.split(",") if x.strip()]
    if not items:
        raise ConfigError(f"{option}: no seed given; expected whole numbers separated by commas, e.g. 0,1,2")
    seeds = []
    for item in items:
        try:
            seeds.append(int(item))
        except ValueError:
            raise ConfigError(f"{option}: {item!r} is not a whole number; expected e.g. 0,1,2") from None
        if seeds[-1] < 0:
            raise ConfigError(f"{option}: {item} is negative; a seed is a whole number from 0, e.g. 0,1,2")
    twice = sorted({s for s in seeds if seeds.count(s) > 1})
    if twice:
        raise ConfigError(f"{option}: seed {', '.join(map(str, twice))} is given twice; each seed runs once")
    return seeds


def seeds_of(cfg: RunConfig, given: list[int] | None, option: str = "--seeds") -> list[int] | None:
    """The seeds to run: ``given`` (the command line's) or ``cfg.seeds``; None for a single run.
    ``ConfigError`` when both are set and differ."""
    if given is not None and cfg.seeds is not None and given != cfg.seeds:
        raise ConfigError(
            f"{option} {','.join(map(str, given))} and the config's seeds: {cfg.seeds} disagree; "
            "give the seeds in one place"
        )
    return given if given is not None else cfg.seeds


def seed_config(cfg: RunConfig, seed: int) -> RunConfig:
    """The config of seed ``seed``'s run: ``cfg`` with ``seed: seed``, no ``seeds``, and its folder
    ``cfg.run_dir/seed-<s>`` (``runs_dir: cfg.run_dir``, ``name: seed-<s>``)."""
    data = cfg.model_dump(mode="json") | {
        "seed": seed,
        "seeds": None,
        "name": seed_folder(seed),
        "runs_dir": str(cfg.run_dir),
    }
    return RunConfig.model_validate(data)


def shared_differences(a: dict[str, Any], b: dict[str, Any], also: frozenset[str] = frozenset()) -> list[str]:
    """The dotted keys in which two configs (``model_dump`` dicts) differ, leaving out ``SEED_OWN``
    and the keys (or sections) in ``also``."""
    skip = SEED_OWN | also
    return [d for d in _differences(a, b) if not covered(d, skip)]


@dataclass(frozen=True)
class SeedRuns:
    """The parent folder of a multi-seed run (see the module docstring)."""

    path: Path

    @property
    def manifest_file(self) -> Path:
        return self.path / MANIFEST

    def run(self, seed: int) -> RunDir:
        return RunDir(self.path / seed_folder(seed))

    @classmethod
    def find(cls, path: str | Path) -> SeedRuns | None:
        """The multi-seed run in ``path``, or None when it is none: a single run (a ``config.yaml``
        of its own), or no manifest and no ``seed-<int>`` folder holding a run."""
        runs = cls(Path(path))
        if RunDir(runs.path).config_file.exists():
            return None
        return runs if runs.manifest_file.exists() or runs.present_seeds() else None

    def present_seeds(self) -> list[int]:
        """The seeds whose folder holds a run (a ``config.yaml``), in numeric order."""
        if not self.path.is_dir():
            return []
        found = []
        for p in self.path.iterdir():
            m = _SEED_FOLDER.fullmatch(p.name)
            if m and p.is_dir() and (p / "config.yaml").exists():
                found.append(int(m.group(1)))
        return sorted(found)

    def read_manifest(self) -> dict[str, Any] | None:
        """``seeds.json`` as written (``{"schema_version", "seeds", "config"}``), or None when absent;
        ``ConfigError`` when it cannot be read."""
        if not self.manifest_file.exists():
            return None
        try:
            data = json.loads(self.manifest_file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ConfigError(f"{self.manifest_file}: cannot be read: {exc}") from None
        if not isinstance(data, dict) or not isinstance(data.get("seeds"), list) or "config" not in data:
            raise ConfigError(f"{self.manifest_file}: not a parlay seeds manifest (expected seeds and config)")
        return data

    def write_manifest(self, cfg: RunConfig, seeds: list[int]) -> None:
        """Write ``seeds.json`` atomically: the seeds and ``cfg`` without its seed."""
        config = {k: v for k, v in cfg.model_dump(mode="json").items() if k not in {"seed", "seeds"}}
        data = {"schema_version": MANIFEST_VERSION, "seeds": seeds, "config": config}
        write_lines_atomic(self.manifest_file, [json.dumps(data, indent=1)])

    def seeds(self) -> list[int]:
        """The manifest's seeds followed by any other seed folder present (numeric order), or,
        without a manifest, the seed folders present."""
        manifest = self.read_manifest()
        listed = [int(s) for s in manifest["seeds"]] if manifest else []
        return listed + [s for s in self.present_seeds() if s not in listed]

    def check(self) -> list[str]:
        """What a reader should know (seeds listed but not started); ``ConfigError`` naming the
        folder when a seed's config is not the others' but for ``SEED_OWN`` and the resumable
        settings, or when a folder's ``seed`` is not its name's."""
        notes = []
        manifest = self.read_manifest()
        present = self.present_seeds()
        reference: tuple[str, dict[str, Any]] | None = (
            (str(self.manifest_file), manifest["config"]) if manifest else None
        )
        for s in present:
            run = self.run(s)
            saved = run.load_config()
            if saved.seed != s:
                raise ConfigError(
                    f"{run.config_file}: seed: {saved.seed} in a folder named {seed_folder(s)}; "
                    f"a seed folder holds that seed's run (rename the folder or move it out of {self.path})"
                )
            dump = saved.model_dump(mode="json")
            if reference is None:
                reference = (str(run.config_file), dump)
                continue
            differ = shared_differences(reference[1], dump, frozenset(RESUMABLE_CHANGES))
            if differ:
                raise ConfigError(
                    f"{run.config_file}: differs from {reference[0]} in {', '.join(differ)}; the seeds of a run "
                    f"share every setting but the seed (move that folder out of {self.path})"
                )
        if manifest:
            absent = [s for s in manifest["seeds"] if s not in present]
            if absent:
                notes.append(f"seed(s) {', '.join(map(str, absent))} listed in {MANIFEST} not started")
        return notes

    def check_start(self, cfg: RunConfig, seeds: list[int], resume: bool) -> None:
        """Before ``parlay train --seeds`` runs anything: ``ConfigError`` when the parent holds a
        single run, when it already holds seeds and ``resume`` is not set, when there is nothing
        to resume, or when a seed's saved config differs from ``cfg`` (the manifest's, or a seed
        folder's) in more than ``SEED_OWN`` and, with ``resume``, the resumable settings."""
        if RunDir(self.path).config_file.exists():
            raise ConfigError(
                f"{self.path} holds a single run (config.yaml); a run over seeds needs a folder of its own: "
                "choose another name"
            )
        started = self.present_seeds()
        if not resume:
            if started or self.manifest_file.exists():
                raise ConfigError(
                    f"{self.path} already holds a run over seeds; pass --resume to continue it, or choose another name"
                )
            return
        if not started and not self.manifest_file.exists():
            raise ConfigError(f"{self.path}: no run over seeds here to resume (no {MANIFEST}, no seed-<s>/ folder)")
        self.check()
        allowed = frozenset(RESUMABLE_CHANGES)
        manifest = self.read_manifest()
        given = cfg.model_dump(mode="json")
        if manifest:
            differ = shared_differences(manifest["config"], given, allowed)
            if differ:
                raise ConfigError(
                    f"{self.manifest_file}: the config given differs from the run's in {', '.join(differ)}; "
                    f"a resumed run keeps its settings (only {', '.join(sorted(RESUMABLE_CHANGES))} may change)"
                )
        for s in started:
            run = self.run(s)
            saved = run.load_config()
            differ = shared_differences(saved.model_dump(mode="json"), given, allowed)
            if differ:
                raise ConfigError(
                    f"{run.config_file}: this seed's run differs from the config given in {', '.join(differ)}; "
                    f"a resumed run keeps its settings (only {', '.join(sorted(RESUMABLE_CHANGES))} may change)"
                )
            if run.path.resolve() != saved.run_dir.resolve():
                raise ConfigError(
                    f"{run.config_file}: saved for {saved.run_dir}, found in {run.path}; resume it from the folder "
                    "it was started in (runs_dir is relative to it), or move it back"
                )

    def config_for(self, cfg: RunConfig, seed: int) -> RunConfig:
        """Seed ``seed``'s config (``seed_config``); for a seed folder already there, with the
        ``runs_dir`` and ``name`` it was saved with (the same folder, perhaps spelled otherwise)."""
        mine = seed_config(cfg, seed)
        run = self.run(seed)
        if run.config_file.exists():
            saved = run.load_config()
            if saved.run_dir.resolve() == run.path.resolve():
                mine = mine.model_copy(update={"runs_dir": saved.runs_dir, "name": saved.name})
        return mine


def ask_for_seed(asked: object, runs: SeedRuns, what: str) -> ConfigError:
    """The error for a spec or option that names a multi-seed parent where one run is needed."""
    seeds = runs.seeds()
    example = seeds[0] if seeds else 0
    return ConfigError(
        f"{asked}: {runs.path} holds one run per seed ({', '.join(seed_folder(s) for s in seeds)}); "
        f"{what} (e.g. {runs.path / seed_folder(example)})"
    )


def pick_seed(path: str | Path, seed: int | None, option: str = "--seed") -> Path:
    """The run folder a command reads: ``path`` itself for a single run (or a file), its
    ``seed-<seed>/`` for a run over seeds. ``ConfigError`` naming ``option``: a seed given for
    what is not a run over seeds, none given for one that is, or one it does not hold."""
    runs = SeedRuns.find(path)
    if runs is None:
        if seed is not None:
            raise ConfigError(
                f"{option} {seed}: {path} is not a run over seeds (no seed-<s>/ folders); leave {option} out"
            )
        return Path(path)
    if seed is None:
        raise ask_for_seed(path, runs, f"choose one with {option} S")
    if seed not in runs.present_seeds():
        raise ConfigError(
            f"{option} {seed}: {path} holds no run for seed {seed} (seeds: {', '.join(map(str, runs.present_seeds()))})"
        )
    return runs.run(seed).path
