#!/usr/bin/env bash
# Every GPU figure minflux records, in one run on one CUDA machine, within a time budget.
#
#   bash bench/gpu_session.sh OUT_DIR [SECONDS] [PART ...]
#
# PARTs (default: all, in this order):
#   env      GPU, driver and library versions                       -> OUT/log.txt
#   mfu      training step time and MFU, flux2-klein-4b, 1024 px, bf16, remat, JAX (XLA and cuDNN
#            attention) and PyTorch                                  -> OUT/train-mfu.json
#   klein    parity, flux2-klein-4b random weights, 1024 px, fp32 + bf16  -> OUT/flux2-klein-4b-cuda.json
#   canary   the gpu-marked tests: TF32 left on must fail the fp32 bar
#   flux1    parity, flux1-dev random weights, 1024 px, fp32              -> OUT/flux1-dev-cuda.json
# Each part gets at most its own limit and what is left of SECONDS; logs go to OUT/log.txt.
# Needs python3 with torch (CUDA), jax (CUDA), flax, optax, orbax-checkpoint, safetensors, einops, rich,
# pytest; wheels in .whl/ are installed offline when rich or tqdm is missing.
set -u
out=${1:?usage: bash bench/gpu_session.sh OUT_DIR [SECONDS] [PART ...]}
budget=${2:-540}
shift $(( $# >= 2 ? 2 : 1 ))
parts=${*:-env mfu klein canary flux1}
end=$(( $(date +%s) + budget ))
py=${PYTHON:-python3}
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
log=$out/log.txt

step() {  # step LIMIT NAME CMD...: run CMD for at most min(LIMIT, time left), output appended to the log
  local limit=$1 name=$2 t
  shift 2
  t=$(( end - $(date +%s) ))
  (( t > limit )) && t=$limit
  if (( t < 30 )); then echo "== $name: skipped, $t s left" | tee -a "$log"; return; fi
  echo "== $name (at most $t s): $*" | tee -a "$log"
  local t0=$(date +%s)
  timeout "$t" "$@" >>"$log" 2>&1
  echo "== $name: exit $? after $(( $(date +%s) - t0 )) s" | tee -a "$log"
}

$py -c "import rich, tqdm" 2>/dev/null || $py -m pip install -q --no-deps --no-index .whl/*.whl >>"$log" 2>&1
parity=("$py" -m minflux_cli parity --random-weights --device cuda --resolution 1024)
for part in $parts; do
  case $part in
    env) step 60 env bash -c "nvidia-smi; $py -c 'import sys, torch, jax, flax, optax; print(sys.version); \
print(\"torch\", torch.__version__, torch.version.cuda, torch.cuda.get_device_name()); \
print(\"jax\", jax.__version__, jax.devices(), \"flax\", flax.__version__, \"optax\", optax.__version__)'" ;;
    mfu) step 320 mfu "$py" bench/bench_train_mfu.py --jax-attention xla,cudnn --timeout 200 \
           --json "$out/train-mfu.json" ;;
    klein) step 200 klein "${parity[@]}" --dtype fp32,bf16 --model flux2-klein-4b --json "$out/flux2-klein-4b-cuda.json" ;;
    canary) step 120 canary "$py" -m pytest -q -m gpu tests/test_parity.py ;;
    flux1) step 400 flux1 "${parity[@]}" --dtype fp32 --model flux1-dev --json "$out/flux1-dev-cuda.json" ;;
    *) echo "unknown part $part" | tee -a "$log"; exit 2 ;;
  esac
done
