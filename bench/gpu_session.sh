#!/usr/bin/env bash
# Every GPU figure minflux records, in one run on one CUDA machine, within a time budget.
#
#   bash bench/gpu_session.sh OUT_DIR [SECONDS] [PART ...]
#
# PARTs (default: the issue-14 set below, in this order, most important first; JAX before PyTorch in each, so
# a slow torch.compile cannot starve it; a backend cut short keeps the rows it finished):
#   env        GPU, driver and library versions                                     -> OUT/log.txt
#   klein      `minflux bench` flux2-klein-4b, 1024 px, bf16: one step, fp8 step, full fine-tuning step
#              (remat full), JAX cuDNN attention vs torch.compile, fp8 parity per block -> OUT/bench-klein.json
#   flux1      `minflux bench` flux1-dev one step + fp8 step, JAX cuDNN vs torch.compile -> OUT/bench-flux1.json
#   flux2dev   `minflux bench` flux2-dev one step, JAX cuDNN vs torch.compile            -> OUT/bench-flux2dev.json
#   rest       flux2-klein-4b: the other rows and backends (eager PyTorch, JAX XLA attention: sample with
#              decode, LoRA step)                                                       -> OUT/bench-klein-rest.json
#   remat      JAX cuDNN training step with remat attention_dots (memory for speed)     -> OUT/bench-remat.json
#   xlaflags   the same step without minflux.bench.XLA_GPU_FLAGS (what the flags buy)   -> OUT/bench-noflags.json
#   fp8gpu     the gpu-marked fp8 tests: torch._scaled_mm vs fake-quant, XLA's fp8 GEMM rewrite
# Older parts, by name only: mfu (bench_train_mfu.py), parity (klein parity fp32 + bf16), canary (TF32),
# flux1parity (flux1-dev parity fp32).
# Each part gets at most its own limit and what is left of SECONDS; logs go to OUT/log.txt.
# Needs python3 with torch (CUDA), jax (CUDA), flax, optax, orbax-checkpoint, safetensors, einops, rich,
# matplotlib, pytest; wheels in .whl/ are installed offline when rich or tqdm is missing.
set -u
out=${1:?usage: bash bench/gpu_session.sh OUT_DIR [SECONDS] [PART ...]}
budget=${2:-540}
shift $(( $# >= 2 ? 2 : 1 ))
parts=${*:-env klein flux1 flux2dev rest remat xlaflags fp8gpu}
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
bench=("$py" -m minflux_cli bench --resolution 1024 --txt-len 512 --repeats 5)
for part in $parts; do
  case $part in
    env) step 60 env bash -c "nvidia-smi; $py -c 'import sys, torch, jax, flax, optax; print(sys.version); \
print(\"torch\", torch.__version__, torch.version.cuda, torch.cuda.get_device_name()); \
print(\"jax\", jax.__version__, jax.devices(), \"flax\", flax.__version__, \"optax\", optax.__version__)'" ;;
    klein) step 300 klein "${bench[@]}" --model flux2-klein-4b --kinds forward,fp8,train --remat full --timeout 150 \
             --backends jax-cudnn,torch-compile --fp8-parity --json "$out/bench-klein.json" --plot "$out/bench-klein.png" ;;
    flux1) step 220 flux1 "${bench[@]}" --model flux1-dev --kinds forward,fp8 --backends jax-cudnn,torch-compile \
             --timeout 110 --json "$out/bench-flux1.json" ;;
    flux2dev) step 220 flux2dev "${bench[@]}" --model flux2-dev --kinds forward --backends jax-cudnn,torch-compile \
                --repeats 3 --timeout 110 --json "$out/bench-flux2dev.json" ;;
    rest) step 240 rest "${bench[@]}" --model flux2-klein-4b --kinds forward,sample,lora --steps 4 --remat full \
            --backends jax-xla,jax-cudnn,torch-eager --timeout 80 --json "$out/bench-klein-rest.json" ;;
    remat) step 100 remat "${bench[@]}" --model flux2-klein-4b --kinds train --remat attention_dots \
             --backends jax-cudnn --json "$out/bench-remat.json" ;;
    xlaflags) step 100 xlaflags "${bench[@]}" --model flux2-klein-4b --kinds train --remat full --xla-flags none \
                --backends jax-cudnn --json "$out/bench-noflags.json" ;;
    fp8gpu) step 90 fp8gpu "$py" -m pytest -q -m gpu tests/test_fp8.py ;;
    mfu) step 320 mfu "$py" bench/bench_train_mfu.py --jax-attention xla,cudnn --timeout 200 \
           --json "$out/train-mfu.json" ;;
    parity) step 200 parity "${parity[@]}" --dtype fp32,bf16 --model flux2-klein-4b \
              --json "$out/flux2-klein-4b-cuda.json" ;;
    canary) step 120 canary "$py" -m pytest -q -m gpu tests/test_parity.py ;;
    flux1parity) step 400 flux1parity "${parity[@]}" --dtype fp32 --model flux1-dev --json "$out/flux1-dev-cuda.json" ;;
    *) echo "unknown part $part" | tee -a "$log"; exit 2 ;;
  esac
done
