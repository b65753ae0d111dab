#!/usr/bin/env bash
# The GPU training recipe, run and timed on one CUDA machine (issue 3):
#   1. SPHINX-Tiny at full size (3.09 B parameters, random init, frozen encoders) through torchrun,
#      FSDP2, bf16 autocast and activation checkpointing: tokens/s per GPU and MFU, then a DCP
#      checkpoint.
#   2. SPHINX-Nano's recipe on the GPU (batch/learning-rate variants, run side by side). Each
#      variant gets as many steps as fit in NANO_SECONDS (timed by a short first run), then it is
#      evaluated on the held-out split. Nano on a GPU is bound by image loading on the CPU (4.4 ms
#      per example per core), so one variant with all the cores goes furthest.
# Needs only the repository and a python with torch, pillow, sentencepiece, safetensors, typer, rich.
#   OUT=/tmp/cuda bash benchmarks/cuda_recipe.sh
set -euo pipefail
out=${OUT:-runs/cuda}
work=${WORK:-/tmp/sphinx-cuda}
tiny_size=${TINY_SIZE:-tiny}  # test-tiny: a dry run of this script on a CPU
tiny_steps=${TINY_STEPS:-100}
timing_steps=${TIMING_STEPS:-150}  # the last third is timed: by then the prefetch queue has drained
nano_seconds=${NANO_SECONDS:-240}
nano_images=${NANO_IMAGES:-60000}
py=${PYTHON:-python3}
mkdir -p "$out" "$work"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
cli() { "$py" -m sphinx_edge.cli "$@"; }
tokenizer=$PWD/sphinx_edge/weights/nano/tokenizer.model
t0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - t0 )) s] $*"; }

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
  "$py" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda,
                                torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"
  nproc; free -g | head -2; df -h /tmp /dev/shm | tail -2; } 2>&1 | tee "$out/env.txt"

stamp "synthetic data"
cli data synth --out "$work/small" --train 1000 --test 10 --workers 8 >/dev/null
cli data synth --out "$work/nano" --train "$nano_images" --test 500 --workers 10 > "$work/synth.log" 2>&1 &
synth=$!

# 1. Tiny. stop_after ends the run early (a time box): the schedule spans 2x the steps run.
stamp "tiny: $tiny_steps steps"
ckpt=$work; [ "$(df --output=avail -BG /dev/shm | tail -1 | tr -dc 0-9)" -gt 40 ] && ckpt=/dev/shm
OMP_NUM_THREADS=8 "$py" -m torch.distributed.run --standalone --nproc_per_node 1 -m sphinx_edge.train.recipe recipes/tiny.toml \
    size="$tiny_size" out_dir="$ckpt/tiny" tokenizer="$tokenizer" data="[{\"json\": \"$work/small/train.json\"}]" \
    steps=$(( 2 * tiny_steps )) stop_after="$tiny_steps" warmup_steps=10 log_every=10 save_every=100000 \
    num_workers=6 2>&1 | tee "$out/tiny.log"
cp "$ckpt/tiny/metrics.jsonl" "$out/tiny-metrics.jsonl"
du -sh "$ckpt/tiny/checkpoints"/step_* | tee -a "$out/tiny.log"
rm -rf "$ckpt/tiny"

# 2. Nano variants: name batch_size lr warmup workers
variants=("b64-lr2e-3 64 2e-3 200 14")
wait "$synth"; stamp "nano data ready"
nano() {  # name batch lr warmup workers steps out
    OMP_NUM_THREADS=2 "$py" -m sphinx_edge.train.recipe recipes/nano.toml out_dir="$7" tokenizer="$tokenizer" \
        data="[{\"json\": \"$work/nano/train.json\"}]" batch_size="$2" lr="$3" warmup_steps="$4" \
        num_workers="$5" steps="$6" log_every=500 save_every=100000
}
stamp "nano: timing $timing_steps steps of each variant, side by side"
for v in "${variants[@]}"; do set -- $v; nano "$@" "$timing_steps" "$work/time-$1" > "$out/time-$1.log" 2>&1 & done
wait
for v in "${variants[@]}"; do
    set -- $v
    step_s=$("$py" -c "import json,statistics,sys; r=[json.loads(l)['step_s'] for l in open(sys.argv[1])]; r=r[2*len(r)//3:]; print(statistics.median(r))" "$work/time-$1/metrics.jsonl")
    steps=$("$py" -c "print(max(2, int($nano_seconds / $step_s)))")
    stamp "nano $1: $step_s s/step -> $steps steps"
    nano "$@" "$steps" "$work/nano-$1" > "$out/nano-$1.log" 2>&1 &
done
wait
stamp "nano: evaluating"
for v in "${variants[@]}"; do
    set -- $v
    OMP_NUM_THREADS=4 cli eval --checkpoint "$work/nano-$1/model" --data "$work/nano/test.json" \
        ${EVAL_LIMIT:+--limit "$EVAL_LIMIT"} --json "$work/eval-$1.json" > "$work/eval-$1.txt" 2>&1 &
done
wait
for v in "${variants[@]}"; do
    set -- $v; cp "$work/nano-$1/metrics.jsonl" "$out/nano-$1-metrics.jsonl"; cp "$work/eval-$1".* "$out/"
done
best=$("$py" -c "
import json, sys
names = sys.argv[1:]
print(max(names, key=lambda n: json.load(open(f'$work/eval-{n}.json'))['accuracy']))" $(for v in "${variants[@]}"; do set -- $v; echo "$1"; done))
stamp "best nano variant: $best"
tar -C "$work/nano-$best" -czf "$work/best-model.tar.gz" model
split -b 15M "$work/best-model.tar.gz" "$out/best-model-$best.tar.gz."
cd "$out" && tar -czf results.tar.gz --remove-files ./*.log ./*.jsonl ./*.json ./*.txt
stamp done
