#!/usr/bin/env bash
# Fills .whl/ (git-ignored) with what a lent GPU machine's python3 (3.12, torch with CUDA, no registry) lacks for
# vlflow: the pinned transformers 4.x stack, colossalai (built here from its sdist) and its --no-deps imports.
# bitsandbytes goes without its CUDA kernels (colossalai imports its optimizer classes; vlflow never calls them),
# which keeps the carried tree under the device tool's 64 MiB. benchmarks/gpu_check.sh installs .whl/ there.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
pin() { grep -i "^$1==" requirements/constraints.txt; }
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${platforms[@]}" \
  -d .whl "$(pin transformers)" "$(pin tokenizers)" "$(pin huggingface-hub)" "$(pin peft)" "$(pin galore-torch)" \
  "$(pin pydantic)" pydantic_core==2.50.4 annotated-types typing-inspection "$(pin bitsandbytes)"
python3 -m pip wheel -q --no-deps --no-build-isolation "$(pin colossalai)" -w .whl
python3 - <<'PY'
import re, zipfile
from pathlib import Path
for wheel in Path(".whl").glob("bitsandbytes-*.whl"):
    slim = wheel.with_suffix(".slim")
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(slim, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            if re.search(r"libbitsandbytes_cuda\d+\.so$", info.filename):
                continue
            data = src.read(info.filename)
            if info.filename.endswith("RECORD"):
                data = b"\n".join(l for l in data.split(b"\n") if not re.search(rb"libbitsandbytes_cuda\d+", l))
            dst.writestr(info, data)
    slim.replace(wheel)
PY
du -sh .whl
