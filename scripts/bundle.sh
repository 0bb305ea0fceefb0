#!/usr/bin/env bash
# Rebuild everything speckv ships from the demo pair, in order. Each step's command is the
# one the README quotes; figures land in runs/bundle/ (git-ignored) for the notes.
#   1. profile (trace, every suite prompt x fp16/int8/nf4; two shards side by side, one
#      thread each), and trace against live profiling speed on the same prompts
#   2. merge, figures, train (seed 0), export, evaluate (both objectives), controller latency,
#      the drafts compared, the live benchmark (nothing else should run on the machine then)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
REC=datamodules/smollm2-demo/smollm2-demo.parquet
OUT=runs/bundle
mkdir -p "$OUT"
if [ ! -f "$REC" ]; then
  # --dtype auto, measured once on the quiet machine and cached, so both shards read one choice
  $PY -c "from speckv.decode.dtype import choose_dtype; from speckv.llm.weights import DEMO_TARGET
print(choose_dtype(DEMO_TARGET, 'fp16', threads=1).describe())" | tee "$OUT/dtype_auto.txt"
  for i in 0 1; do
    $PY -m speckv profile --compression fp16,int8,nf4 --mode trace --per-task 120 \
      --max-new-tokens 96 --threads 1 --shard $i/2 --out "$REC" &
  done
  wait
  $PY -m speckv records merge datamodules/smollm2-demo/smollm2-demo.shard0of2.parquet \
    datamodules/smollm2-demo/smollm2-demo.shard1of2.parquet --out "$REC"
  rm -rf datamodules/smollm2-demo/smollm2-demo.shard*.parquet "$REC.parts"
  # the shards measured their costs side by side: measure them again, alone on the machine
  $PY scripts/reprice_records.py "$REC" > "$OUT/reprice.jsonl"
fi
# records/s of trace and live profiling, same pair, prompts and machine (one process)
for mode in trace live; do
  $PY -m speckv profile --compression fp16 --mode $mode --per-task 2 --max-new-tokens 96 \
    --threads 1 --out "$OUT/speed-$mode.parquet" --json > "$OUT/profile_$mode.json"
  rm -rf "$OUT/speed-$mode.parquet" "$OUT/speed-$mode.parquet.parts"
done
$PY -m speckv records figures "$REC" --out datamodules/smollm2-demo/figures --json > "$OUT/figures.json"
start=$(date +%s%N)
$PY -m speckv.train fit --trainer.enable_progress_bar false 2> "$OUT/fit.log"
echo "fit wall ms: $(( ($(date +%s%N) - start) / 1000000 ))" | tee "$OUT/fit_time.txt"
CKPT=$(ls -t lightning_logs/version_*/checkpoints/*.ckpt | head -1)
$PY -m speckv.train test --ckpt_path "$CKPT" --trainer.enable_progress_bar false \
  > "$OUT/test.txt" 2> "$OUT/test.log"
$PY -m speckv export --ckpt "$CKPT" --out export/speckv.onnx --json > "$OUT/export.json"
$PY -m speckv evaluate --controller export/speckv.onnx --report "$OUT/report" --json \
  > "$OUT/evaluate.json"
$PY -m speckv evaluate --ckpt "$CKPT" --json > "$OUT/evaluate_ckpt.json"
$PY -m speckv evaluate --controller export/speckv.onnx --objective tokens_per_step \
  --report "$OUT/report-tokens-per-step" --json > "$OUT/evaluate_tokens_per_step.json"
# the context lookup when it matches 1+ tokens, else the controller
$PY -m speckv evaluate --controller export/speckv.onnx \
  --policy "lookup:1+onnx:export/speckv.onnx" --report "$OUT/report-lookup" --json \
  > "$OUT/evaluate_lookup.json"
# the lookup's continuation joined to the trees (one forward for both), and the fixed rules
$PY -m speckv evaluate --controller export/speckv.onnx --policy join:1+tree:4 \
  --policy join:2+tree:4 --policy join:1+tree:8 --policy "join:1+onnx:export/speckv.onnx" \
  --policy "lookup:2+onnx:export/speckv.onnx" --policy "join:1+lookup:2+onnx:export/speckv.onnx" \
  --json > "$OUT/evaluate_join.json"
$PY -m speckv bench-controller --controller export/speckv.onnx --json > "$OUT/bench_controller.json"
# the drafts on the same answers, then the live benchmark: run it alone on the machine
# "+ reduced vocabulary": v1 with the demo draft's 8,192-token head, nothing retrained
$PY scripts/reduce_head.py models/speckv-draft-v1 --tokens-from models/speckv-draft \
  --out runs/drafts/speckv-draft-v1-reduced
$PY -m speckv draft evaluate \
  --draft models/speckv-draft-v1,runs/drafts/speckv-draft-v1-reduced,models/speckv-draft-v2,speckv-draft \
  --compression fp16,int8,nf4 --per-task 5 --max-new-tokens 48 --threads 1 --json \
  > "$OUT/draft_evaluate.json"
# Hugging Face's own assisted rows need a causal-LM assistant: the best one speckv has.
C=export/speckv.onnx
FP16_METHODS="ar,hf:ar,hf:constant:1,hf:constant:2,hf:defaults,hf:lookup,hf:lookup:3"
FP16_METHODS="$FP16_METHODS,speckv:fixed:2,speckv:fixed:3,speckv:tree:4,speckv:tree:8"
FP16_METHODS="$FP16_METHODS,speckv:best_static,speckv:lookup:1,speckv:onnx:$C"
FP16_METHODS="$FP16_METHODS,speckv:lookup:1+onnx:$C,speckv:lookup:auto+onnx:$C,hf:speckv"
QUANT_METHODS="ar,hf:lookup,speckv:fixed:2,speckv:tree:4,speckv:best_static,speckv:lookup:1"
QUANT_METHODS="$QUANT_METHODS,speckv:onnx:$C,speckv:lookup:1+onnx:$C,speckv:lookup:auto+onnx:$C"
# 96 new tokens, the records' length, so live and replayed figures describe the same answers
# (prefill is timed too: a short answer dilutes any speed-up)
$PY -m speckv bench --per-task 1 --repeats 2 --max-new-tokens 96 --compression fp16 \
  --hf-draft models/speckv-draft-v2 --threads 1 --methods "$FP16_METHODS" --json \
  > "$OUT/bench.json"
$PY -m speckv bench --per-task 1 --repeats 2 --max-new-tokens 96 --compression int8,nf4 \
  --methods "$QUANT_METHODS" --threads 1 --json > "$OUT/bench_quantized.json"
echo "done: $OUT"
