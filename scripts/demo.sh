#!/usr/bin/env bash
# `make demo`: the whole persres flow on a tiny, randomly initialised Stable Diffusion model.
# It runs offline on a CPU in under a minute. THE IMAGES ARE NOISE: the tiny model was never
# trained. On a GPU with real weights, see "Real use" in the README.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1
PY=.venv/bin/python
OUT=demo-output
PERSRES=".venv/bin/persres"

echo "== persres demo on a tiny random model: the images it writes are noise, by design =="
rm -rf "$OUT/run" "$OUT/samples" "$OUT/merged" "$OUT/benchmark"  # the demo's own scratch folders only
"$PY" scripts/demo_setup.py "$OUT"

echo "== train (30 steps, CPU) =="
"$PERSRES" train --base "$OUT/tiny-base" --images "$OUT/photos" --class-word dog --out "$OUT/run" \
    --steps 30 --batch-size 2 --resolution 32 --checkpoint-every 10 --device cpu

echo "== sample =="
"$PERSRES" sample --base "$OUT/tiny-base" --residuals "$OUT/run/residuals.safetensors" --out "$OUT/samples" \
    --prompt "a photo of a V* dog on the beach" --prompt "a painting of a V* dog" \
    --num-images 2 --steps 10 --height 32 --width 32 --device cpu --sampler both --save-masks

echo "== info =="
"$PERSRES" info "$OUT/run/residuals.safetensors"

echo "== merge =="
"$PERSRES" merge --base "$OUT/tiny-base" --residuals "$OUT/run/residuals.safetensors" --out "$OUT/merged"

echo "== benchmark (CustomConcept101 format, 6 prompt kinds, normal/LAG/auto) and report =="
echo "   (the scorers are random tiny CLIP/DINO models here: the numbers test the pipeline, not quality)"
"$PERSRES" benchmark --dataset "$OUT/cc101" --base "$OUT/tiny-base" --out "$OUT/benchmark" \
    --steps 20 --batch-size 2 --resolution 32 --images-per-prompt 2 --sample-steps 10 --height 32 --width 32 \
    --clip "$OUT/tiny-clip" --dino "$OUT/tiny-dino" --device cpu
"$PERSRES" report "$OUT/benchmark"

echo "Done. Outputs in $OUT/: run/ (residuals, checkpoints), samples/ (noise images with JSON sidecars,"
echo "normal|LAG grids, mask strips), merged/ (a plain diffusers pipeline), benchmark/ (results.csv,"
echo "summary.json, report.html)."
