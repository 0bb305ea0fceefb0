#!/usr/bin/env bash
# llama.cpp's record set, the controller trained on it, and the benchmark inside llama.cpp
# (README "Inside llama.cpp"). Each step's command is the one the README quotes; figures land
# in runs/bundle-llamacpp/ (git-ignored).
#   1. profile in llama.cpp (trace, 60 prompts per task x Q4_1/Q8_0/F16, two shards of one
#      thread; resumable: run the script again after a kill), merge, then measure the costs
#      again alone on the machine
#   2. figures, train (seed 0), export, replay (both controllers on llama.cpp's records)
#   3. the live benchmark at each quantization (nothing else should run on the machine then)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
SET=datamodules/smollm2-llamacpp
REC=$SET/smollm2-llamacpp.parquet
OUT=runs/bundle-llamacpp
C=export/speckv-llamacpp.onnx
mkdir -p "$OUT"
if [ ! -f "$REC" ]; then
  for i in 0 1; do  # two shards side by side, one thread each
    $PY -m speckv profile --engine llamacpp --quantization q4_1,q8_0,f16 --per-task 60 \
      --max-new-tokens 96 --threads 1 --shard $i/2 --out "$REC" &
  done
  wait
  $PY -m speckv records merge $SET/smollm2-llamacpp.shard0of2.parquet \
    $SET/smollm2-llamacpp.shard1of2.parquet --out "$REC"
  rm -rf $SET/smollm2-llamacpp.shard*.parquet "$REC.parts"
  # the shards measured their costs side by side: measure them again, alone on the machine
  $PY scripts/reprice_records.py "$REC" > "$OUT/reprice.jsonl"
fi
$PY -m speckv records figures "$REC" --out "$SET/figures" --json > "$OUT/figures.json"
rm -rf runs/llamacpp-fit
$PY -m speckv.train fit --data "$SET/data.yaml" --trainer.default_root_dir runs/llamacpp-fit \
  --trainer.enable_progress_bar false 2> "$OUT/fit.log"
CKPT=$(ls -t runs/llamacpp-fit/lightning_logs/version_*/checkpoints/*.ckpt | head -1)
$PY -m speckv export --ckpt "$CKPT" --out "$C" --json > "$OUT/export.json"
$PY -m speckv evaluate --records "$REC" --controller "$C" --report "$OUT/report" --json \
  > "$OUT/evaluate.json"
# the controller trained on Hugging Face's records, replayed on llama.cpp's
$PY -m speckv evaluate --records "$REC" --controller export/speckv.onnx --json \
  > "$OUT/evaluate_hf_controller.json"
# the shipped (Hugging Face-trained) controller and the one trained on llama.cpp's records,
# each alone and choosing the lookup too; prompts held out from both record sets
METHODS="llamacpp:plain,llamacpp:lookup:4,llamacpp:fixed:1,llamacpp:fixed:2,llamacpp:onnx"
METHODS="$METHODS,llamacpp:lookup:auto+onnx,llamacpp:onnx:$C,llamacpp:lookup:auto+onnx:$C"
for q in q4_1 q8_0 f16; do
  $PY -m speckv bench --engine llamacpp --quantization $q --per-task 2 --repeats 3 \
    --max-new-tokens 64 --threads 1 --methods "$METHODS" --json > "$OUT/bench-$q.json"
done
