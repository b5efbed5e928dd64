#!/usr/bin/env bash
# The GPU checks (issue 15, item 6), for the device tool's calls from a session whose task has a GPU:
#   here:  bash experiments/gpu_kit.sh                      (builds .whl/, the packages the image lacks)
#   there: run(command="bash experiments/gpu_check.sh tests", carry=[".whl"], timeout_s=480), then at once
#          (the machine stays warm for 30 s) run(command="bash experiments/gpu_check.sh bench", ...same carry)
# Stages, each time-boxed so that the call ends inside the tool's 10 minutes and its logs come back:
#   tests  the test suite with EVOMERGE_TEST_DEVICE=cuda, in parallel (pytest-xdist is in the image);
#          the Ray tests are left out (Ray's wheel is too large to carry); GPU_CHECK_TESTS narrows the run
#   bench  bench_merge.py in both placements (device, host), then the demo search and its report on cuda;
#          GPU_CHECK_BENCH adds bench_merge arguments (e.g. smaller models for a rehearsal)
# Logs go to $OUT (the device tool's folder that comes back), else /tmp/gpu-check. EVOMERGE_TEST_DEVICE=cpu
# rehearses the whole thing on a CPU machine (a kit built with GPU_PYTHON set to that machine's Python).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/gpu-check}
mkdir -p "$out"
[ -d /tmp/site/lm_eval ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "installing the kit failed (run experiments/gpu_kit.sh here and carry .whl)"; exit 1; }
export PYTHONPATH="/tmp/site:$PWD" PATH="/tmp/site/bin:$PATH" PYTHONUNBUFFERED=1
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__,
        torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"
    python3 -m pip check 2>&1 | grep -v -i -E "^(jax|flax|tensorflow|orbax|chex|optax)" | head -20
} > "$out/env.txt" 2>&1
cat "$out/env.txt"
device=${EVOMERGE_TEST_DEVICE:-cuda}
workers=$(( $(nproc) > 14 ? 14 : $(nproc) ))
for stage in "$@"; do
    case "$stage" in
    tests)
        EVOMERGE_TEST_DEVICE=$device timeout 400 python3 -m pytest -q -p no:cacheprovider -n "$workers" \
            --dist load --ignore tests/test_ray.py -k "not cluster" -W ignore::DeprecationWarning \
            ${GPU_CHECK_TESTS:-tests} > "$out/tests.log" 2>&1
        echo "tests: exit $? (124: timed out)"; tail -n 15 "$out/tests.log"
        ;;
    bench)
        timeout 200 python3 experiments/bench_merge.py --device "$device" --sources both --reps 5 --mergekit-reps 0 \
            --methods linear,ties,dare_ties,breadcrumbs,della ${GPU_CHECK_BENCH:-} > "$out/bench_merge.log" 2>&1
        echo "bench_merge: exit $?"; cat "$out/bench_merge.log" | tail -n 30
        rm -rf /tmp/demo-gpu
        started=$SECONDS
        timeout 120 python3 -m evomerge.cli search configs/demo.yaml --out /tmp/demo-gpu > "$out/demo.log" 2>&1
        echo "demo search: exit $?, $((SECONDS - started)) s wall" | tee -a "$out/demo.log"
        timeout 60 python3 -m evomerge.cli report /tmp/demo-gpu >> "$out/demo.log" 2>&1
        cp /tmp/demo-gpu/search.log "$out/demo-search.log" 2>/dev/null
        tail -n 40 "$out/demo.log"
        ;;
    *) echo "unknown stage $stage (tests, bench)"; exit 2 ;;
    esac
done
