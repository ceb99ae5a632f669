#!/usr/bin/env bash
# The CUDA benchmarks on one GPU in a few minutes: writes results/cuda/*.json.
#
#   bash bench/run_cuda.sh            # from any directory; extra arguments go to pytest
#
# Needs python with a CUDA build of torch, pytest and pytest-benchmark (memeff is imported
# from this checkout, nothing is installed). KV cache, optimizer state, step time and
# sharded (FSDP2 over nccl, one process per GPU: world sizes above the GPU count skip) run
# the full profile; training runs the default one (one seed of AdamW, AdamSN and Adafactor)
# and needs Tiny Shakespeare: MEMEFF_DATA_DIR, else ../shared/data, else a download. Each
# suite has a time limit; a suite that fails or runs out of time writes nothing, and the
# others go on. Without git (a copied tree), set MEMEFF_SOURCE_COMMIT to the commit copied
# so the results record it.
set -uo pipefail
cd "$(dirname "$0")/.."

if ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "run_cuda.sh: torch sees no GPU ($(python -c 'import torch; print(torch.__version__, "CUDA", torch.version.cuda)' 2>&1)); install a CUDA build of torch on a machine with one" >&2
    exit 1
fi
if [[ -z "${MEMEFF_DATA_DIR:-}" && -f ../shared/data/tinyshakespeare/input.txt ]]; then
    export MEMEFF_DATA_DIR="$(cd ../shared/data && pwd)"
fi

status=0
suite() {  # suite TIME_LIMIT_S PROFILE MODULE [pytest args...]
    local limit=$1 profile=$2 module=$3
    shift 3
    echo "== $module (profile $profile, at most ${limit}s)"
    timeout --signal=INT --kill-after=20 "$limit" python -m pytest "$module" --benchmark-only \
        --device cuda --profile "$profile" -q -p no:cacheprovider "$@" || {
        echo "run_cuda.sh: $module failed or ran out of time (exit $?): no results written for it" >&2
        status=1
    }
}
suite 120 full bench/test_kv_cache.py "$@"
suite 90 full bench/test_optimizer_state.py "$@"
suite 90 full bench/test_step_time.py "$@"
suite 120 full bench/test_sharded.py "$@"
suite 150 default bench/test_training.py "$@"
ls -l results/cuda 2>/dev/null
exit $status
