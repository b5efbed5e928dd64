#!/usr/bin/env bash
# The GPU checks (issue 15, item 6), for one call of the device tool from a session whose task has a GPU:
#   here:  bash experiments/gpu_kit.sh                      (builds .whl/, the packages the image lacks)
#   there: run(command="bash experiments/gpu_check.sh tests bench", carry=[".whl"], timeout_s=580)
# Stages, each time-boxed so that the call ends inside the tool's 10 minutes and its logs come back:
#   tests  the test suite with EVOMERGE_TEST_DEVICE=cuda, in parallel (pytest-xdist is in the image);
#          the Ray tests are left out (Ray's wheel is too large to carry)
#   bench  bench_merge.py in both placements (device, host), then the demo search and its report on cuda
# Logs go to $OUT (the device tool's folder that comes back), else /tmp/gpu-check.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/gpu-check}
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "installing the kit failed (run experiments/gpu_kit.sh here and carry .whl)"; exit 1; }
export PYTHONPATH="/tmp/site:$PWD" PATH="/tmp/site/bin:$PATH" PYTHONUNBUFFERED=1
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())"
    python3 -m pip check 2>&1 | grep -v -i -E "^(jax|flax|tensorflow|orbax|chex|optax)" | head -20
} > "$out/env.txt" 2>&1
cat "$out/env.txt"
workers=$(( $(nproc) > 12 ? 12 : $(nproc) ))
for stage in "$@"; do
    case "$stage" in
    tests)
        EVOMERGE_TEST_DEVICE=cuda timeout 330 python3 -m pytest -q -p no:cacheprovider -n "$workers" \
            --dist loadfile --ignore tests/test_ray.py -k "not cluster" -W ignore::DeprecationWarning \
            > "$out/tests.log" 2>&1
        echo "tests: exit $? (124: timed out)"; tail -n 15 "$out/tests.log"
        ;;
    bench)
        timeout 200 python3 experiments/bench_merge.py --device cuda --sources both --reps 5 --mergekit-reps 1 \
            --methods linear,ties,dare_ties,breadcrumbs,della,multislerp > "$out/bench_merge.log" 2>&1
        echo "bench_merge: exit $?"; cat "$out/bench_merge.log" | tail -n 30
        rm -rf /tmp/demo-gpu
        started=$SECONDS
        timeout 150 python3 -m evomerge.cli search configs/demo.yaml --out /tmp/demo-gpu > "$out/demo.log" 2>&1
        echo "demo search: exit $?, $((SECONDS - started)) s wall" | tee -a "$out/demo.log"
        timeout 60 python3 -m evomerge.cli report /tmp/demo-gpu >> "$out/demo.log" 2>&1
        cp /tmp/demo-gpu/search.log "$out/demo-search.log" 2>/dev/null
        tail -n 40 "$out/demo.log"
        ;;
    *) echo "unknown stage $stage (tests, bench)"; exit 2 ;;
    esac
done
