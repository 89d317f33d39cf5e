#!/usr/bin/env bash
# Install msdda and its test tools into ./.venv with the versions we test against.
# torch is installed first and pinned: an unpinned torch would pull a multi-GB CUDA build on a CPU machine.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -c scripts/constraints.txt -e ".[test]"
.venv/bin/python -c "import msdda, torch, diffusers, peft; print(f'msdda {msdda.__version__} (torch {torch.__version__}, diffusers {diffusers.__version__}, peft {peft.__version__}) installed in .venv')"
