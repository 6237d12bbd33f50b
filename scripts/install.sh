#!/usr/bin/env bash
# Installs vlflow and its stack into ./.venv on a fresh machine (CPU or GPU). Idempotent.
# Why in two steps: colossalai 0.5.0, peft, bitsandbytes and timm declare pins (torch<=2.5.1, transformers==4.51.3,
# ray, diffusers, torchvision of other builds, ...) that cannot resolve beside our torch, so they go in with
# --no-deps and we add exactly what the APIs we use import. See README "Installing the stack".
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
C=requirements/constraints.txt
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=(.venv/bin/python -m pip install -q --disable-pip-version-check -c "$C")
# torch + torchvision first, together: a torchvision of another build breaks `import transformers`/`import timm`.
"${PIP[@]}" torch torchvision
# vlflow itself (editable) with its resolvable dependencies and the test tools.
"${PIP[@]}" -e ".[dev]" tensorboard
# Packages whose declared dependencies conflict with the stack above: installed as-is, their real imports are
# exercised by tests/project/test_install.py.
"${PIP[@]}" --no-deps colossalai peft accelerate bitsandbytes galore-torch timm
.venv/bin/python - <<'PY'
import colossalai, timm, transformers, torch
from colossalai.booster import Booster
from colossalai.booster.plugin import TorchDDPPlugin
print(f"vlflow stack ok: torch {torch.__version__}, colossalai {colossalai.__version__}, "
      f"transformers {transformers.__version__}, timm {timm.__version__}")
PY
