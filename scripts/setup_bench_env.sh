#!/usr/bin/env bash
# The benchmark virtualenv: trl 0.23.1 (the last trl with DDPOTrainer) beside torch 2.13.0 and diffusers 0.42.1.
# Kept apart from .venv because DDPOTrainer is no dependency of msdda.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv-bench
.venv-bench/bin/python -m pip install -q "torch==2.13.0"
.venv-bench/bin/python -m pip install -q -c scripts/constraints.txt -e ".[bench]"
