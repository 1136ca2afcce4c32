#!/usr/bin/env bash
# `make demo`: persres end to end in the toy world, offline, on a CPU in a few minutes.
# The base model (models/toyworld-base) is a small text-to-image model trained from scratch on
# procedural scenes (see its README); the concept, a red striped dog, is one it has never seen.
# The oracle (models/toyworld-oracle) knows every scene's truth, so the scores mean something.
# The same demo on the toy Flux base (a FluxPipeline; true classifier-free guidance, 7.5 as on the U-Net;
# unmasked, without min-SNR: the loss options were measured on the U-Net world, min-SNR is for DDPM bases):
#   BASE=models/toyworld-flux OUT=demo-output-flux GUIDANCE=7.5 TRAIN_OPTIONS= bash scripts/demo.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1
PY=.venv/bin/python
PERSRES=".venv/bin/persres"
OUT="${OUT:-demo-output}"
BASE="${BASE:-models/toyworld-base}"
GUIDANCE=(${GUIDANCE:+--guidance "$GUIDANCE"})  # none: the base's default (7.5 on the U-Net)
# The toy U-Net world's loss: the class word's attention maps as the mask, min-SNR weighting (what won on
# the toy world's training instances and held on its held-out concepts: bench/RESULTS.md)
read -r -a TRAIN_OPTIONS <<< "${TRAIN_OPTIONS---mask attention-trained --timestep-weighting min-snr}"
ORACLE=models/toyworld-oracle
RUN="$OUT/run/residuals.safetensors"

case "$OUT" in  # it is removed first: only the demo's own folders
    demo-output*) ;;
    *) echo "OUT must be a folder named demo-output... (it is removed and written anew), got $OUT" >&2; exit 2 ;;
esac
echo "== persres demo in the toy world: base $BASE, oracle $ORACLE =="
rm -rf "$OUT"  # the demo's own output folder only
"$PY" scripts/demo_setup.py "$OUT"

echo "== train: 5 photos of a red striped dog, 400 steps, batch 4, lr 5e-3, 32 px ${TRAIN_OPTIONS[*]} =="
"$PERSRES" train --base "$BASE" --images "$OUT/photos" --class-word dog --out "$OUT/run" \
    --steps 400 --batch-size 4 --lr 5e-3 --resolution 32 --no-flip --checkpoint-every 200 --device cpu \
    "${TRAIN_OPTIONS[@]}"

echo "== sample: normal and LAG from the same noise, with LAG's masks =="
"$PERSRES" sample --base "$BASE" --residuals "$RUN" --out "$OUT/samples" \
    --prompt "a V* dog on the beach" --prompt "a painting of a V* dog" \
    --num-images 2 --steps 25 --height 32 --width 32 --device cpu --sampler both --save-masks "${GUIDANCE[@]}"

echo "== info, evaluate (oracle CLIP/DINO), merge, export as LoRA files =="
"$PERSRES" info "$RUN"
"$PERSRES" evaluate --images "$OUT/samples" --references "$OUT/photos" \
    --clip "$ORACLE/clip" --dino "$ORACLE/dino" --device cpu
"$PERSRES" merge --base "$BASE" --residuals "$RUN" --out "$OUT/merged"
"$PERSRES" export "$OUT/run" --format kohya --out "$OUT/lora/red-striped-dog-kohya.safetensors"
"$PERSRES" export "$OUT/run" --format diffusers --out "$OUT/lora/red-striped-dog-diffusers.safetensors"

echo "== six prompt kinds: base (class word only) | normal | LAG, scored by the oracle =="
"$PY" -m persres.toyworld.demo report --base "$BASE" --oracle "$ORACLE" --residuals "$RUN" \
    --photos "$OUT/photos" --instance dog,red,striped --out "$OUT/toyworld"

echo "== benchmark runner on a CustomConcept101-format dataset, and its report =="
"$PERSRES" benchmark --dataset "$OUT/cc101" --base "$BASE" --out "$OUT/benchmark" \
    --steps 400 --batch-size 4 --lr 5e-3 --resolution 32 --no-flip --images-per-prompt 2 --sample-steps 25 \
    --height 32 --width 32 "${GUIDANCE[@]}" \
    --clip "$ORACLE/clip" --dino "$ORACLE/dino" --device cpu
"$PERSRES" report "$OUT/benchmark"

echo "Done. Open $OUT/toyworld/report.html (base | normal | LAG for six prompt kinds, oracle metrics)."
echo "Also in $OUT/: run/ (residuals, checkpoints), samples/ (PNGs, JSON sidecars, normal|LAG grids, mask"
echo "strips), merged/ (a plain diffusers pipeline), lora/ (the concept as LoRA files for AUTOMATIC1111,"
echo "ComfyUI and diffusers), benchmark/ (results.csv, summary.json, report.html)."
