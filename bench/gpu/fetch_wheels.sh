#!/usr/bin/env bash
# Downloads, here, the wheels the GPU machine lacks for bench/gpu/run.sh into .whl/ (git-ignored): the
# machine has Python 3.12, torch, transformers, safetensors, numpy, pyyaml, tqdm and psutil, but no
# megatron-core, and it cannot reach a package index. Name .whl in the device call's `carry`. Runs with
# the project's .venv when there is one, else with python3's pip (PIP=... chooses another).
set -euo pipefail
cd "$(dirname "$0")/../.."
if [ -z "${PIP:-}" ]; then
    if [ -x .venv/bin/python ]; then PIP=".venv/bin/python -m pip"; else PIP="python3 -m pip"; fi
fi
$PIP download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl "megatron-core==0.16.1"
ls -l .whl
