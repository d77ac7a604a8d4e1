#!/usr/bin/env bash
# The GPU measurements still owed, in order of value, as one command for a short GPU lease (about 8 minutes on an
# H200, inside one 10-minute call). Each step writes its record as it finishes, so a call cut short keeps the rest.
#
#   bash benchmarks/gpu_lease.sh prepare   # here, with network: wheels the GPU image lacks -> .whl/, the peer -> .peer/
#   bash benchmarks/gpu_lease.sh run       # there, from the repository root, with .whl and .peer carried
#
# What it measures (benchmarks/README.md, peer_gpu and tiled_generation sections):
#   1. peer_gpu: the example, our same-work and as-shipped LoRA runs (does the uncached path now match the example?)
#   2. peer_gpu: the best LoRA configuration alone (batch 16, channels-last, compiled; compile time in its wall time)
#   3. tiled_generation --gpu: generate against plain diffusers at 512 px (only if time is left)
# Records land in benchmarks/results/ and, when $OUT is set (the device tool), are copied there too.
set -uo pipefail
cd "$(dirname "$0")/.."

# the GPU image has torch, transformers, accelerate, torchvision and tensorboard; these it lacks or has too old
WHEELS="diffusers==0.42.1 peft==0.21.2 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19"
PEER=../shared/peers/diffusers_train_text_to_image_lora.py

prepare() {
    mkdir -p .git/info .whl .peer
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
    grep -qx '/.peer/' .git/info/exclude 2>/dev/null || echo '/.peer/' >> .git/info/exclude
    # shellcheck disable=SC2086
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl $WHEELS
    cp "$PEER" .peer/  # ../shared does not travel to the device machine
    du -sh .whl .peer
}

keep() {  # a finished record, also where the device tool collects files
    [ -n "${OUT:-}" ] && [ -f "$1" ] && cp "$1" "$OUT/"
    return 0
}

run() {
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || exit 1
    export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
    local peer=.peer/diffusers_train_text_to_image_lora.py log=${OUT:-benchmarks/_work}
    mkdir -p "$log"
    timeout 300 python3 benchmarks/peer_gpu.py --peer "$peer" \
        --only "diffusers example" "ours, same work" "ours, as shipped" > "$log/peer.log" 2>&1
    echo "peer_gpu (same work) exit $?"; grep "ms/step" "$log/peer.log"
    keep benchmarks/results/peer_sd15.json
    timeout 240 python3 benchmarks/peer_gpu.py --peer "$peer" --out benchmarks/results/peer_sd15_best.json \
        --only "ours, best LoRA (batch 16, channels-last, compiled)" > "$log/peer_best.log" 2>&1
    echo "peer_gpu (best LoRA) exit $?"; grep "ms/step" "$log/peer_best.log"
    keep benchmarks/results/peer_sd15_best.json
    timeout 90 python3 benchmarks/tiled_generation.py --gpu > "$log/tiled.log" 2>&1
    echo "tiled_generation --gpu exit $?"
    keep benchmarks/results/tiled_generation_gpu.json
}

case "${1:-}" in
    prepare) prepare ;;
    run) run ;;
    *) echo "usage: bash benchmarks/gpu_lease.sh prepare|run" >&2; exit 2 ;;
esac
