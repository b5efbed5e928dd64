#!/usr/bin/env bash
# Run here (no GPU needed), from the repo root with the dev venv active: builds .whl/, the wheels that the
# GPU checks (experiments/gpu_check.sh) install on the device machine. That machine cannot reach a package
# index and its Python 3.12 image has torch, numpy, pandas, scipy and the like but not lm-eval, cma,
# nevergrad, pydantic, mergekit..., and an older transformers. The kit is this venv's own versions of
# everything else, for CPython 3.12 on x86-64: about 45 MB, under the device tool's 64 MiB.
# Ray is left out (its wheel alone is over the limit), so the GPU checks leave out the Ray tests.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${GPU_PYTHON:-3.12}
# In the image already (see the device tool's KINDS.md), large, or not needed on the device.
skip='^(torch|triton|nvidia-[a-z0-9-]*|cuda-[a-z0-9-]*|numpy|pandas|pyarrow|scipy|scikit-learn|matplotlib'
skip+='|pillow|kiwisolver|contourpy|fonttools|sympy|mpmath|networkx|tokenizers|safetensors|hf[-_]xet|grpcio'
skip+='|lxml|ray|ruff|pytest|pytest-xdist|pluggy|iniconfig|execnet|setuptools|pip|wheel)=='
rm -rf .whl && mkdir .whl
python -m pip freeze --exclude-editable | grep -v -i -E "$skip" > .whl/requirements.txt
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
    platforms+=(--platform "$p")
done
while read -r requirement; do
    python -m pip download -q --no-deps --only-binary=:all: --python-version "$python" --implementation cp \
        "${platforms[@]}" -d .whl "$requirement" 2>/dev/null \
        || python -m pip wheel -q --no-deps -w .whl "$requirement"  # sdist only (pure Python): build it
done < .whl/requirements.txt
echo "$(ls .whl/*.whl | wc -l) wheels, $(du -sh .whl | cut -f1) in .whl/ (carry it: run(carry=[\".whl\"]))"
