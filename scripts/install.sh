#!/usr/bin/env bash
# Install msdda, its test tools, the studio (Gradio, Playwright) and DeepSpeed into ./.venv with the versions we test against.
#   Usage: bash scripts/install.sh [--without-deepspeed]
# torch is installed first and pinned: an unpinned torch would pull a multi-GB CUDA build on a CPU machine.
# DeepSpeed ships only a source distribution. It is built against that torch (--no-build-isolation, so its
# setup.py sees the installed torch, which needs setuptools in the venv) with DS_BUILD_OPS=0: no kernels are
# compiled at install time, so the build needs no compiler, CUDA toolkit or network beyond the package index.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="test,deepspeed,studio"
for arg in "$@"; do
    case "$arg" in
        --without-deepspeed) extras="test,studio" ;;
        *) echo "install.sh: unknown option $arg (the only one is --without-deepspeed)" >&2; exit 2 ;;
    esac
done
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -c scripts/constraints.txt setuptools "torch==2.13.0"
DS_BUILD_OPS=0 .venv/bin/python -m pip install -q --no-build-isolation -c scripts/constraints.txt -e ".[$extras]"
.venv/bin/python -c "import msdda, torch, diffusers, peft; print(f'msdda {msdda.__version__} (torch {torch.__version__}, diffusers {diffusers.__version__}, peft {peft.__version__}) installed in .venv')"
if [ "$extras" = "test,deepspeed,studio" ]; then
    .venv/bin/python -c "import importlib.metadata as m; print(f'deepspeed {m.version(\"deepspeed\")} installed in .venv (no ops compiled)')"
fi
