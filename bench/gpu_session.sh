#!/usr/bin/env bash
# Every GPU figure minflux records, in one call of at most 9 minutes (see bench/gpu_session.py):
#
#   bash bench/gpu_session.sh OUT_DIR [SECONDS] [PART ...]     # default: 540 s; env flux1 klein-train flux1-fp8
#   bash bench/gpu_session.sh OUT_DIR --dry-run                # tiny models on any machine (no GPU needed)
#
# Parts run one after the other, each time-boxed in its own process group; a part that fails or runs out of
# time is logged and the next one starts. Nothing is installed: the machine's torch, jax, flax and diffusers
# are used and their versions recorded (OUT_DIR/env.json). Log: OUT_DIR/log.txt; summary: OUT_DIR/session.json.
set -u
cd "$(dirname "$0")/.."
out=${1:?usage: bash bench/gpu_session.sh OUT_DIR [SECONDS | --dry-run] [PART ...]}
shift
args=()
if [[ ${1:-} == --dry-run ]]; then args+=(--dry-run); shift
elif [[ ${1:-} =~ ^[0-9]+$ ]]; then args+=(--budget "$1"); shift
fi
if (( $# )); then args+=(--parts "$(IFS=,; echo "$*")"); fi
exec "${PYTHON:-python3}" bench/gpu_session.py "$out" "${args[@]}"
