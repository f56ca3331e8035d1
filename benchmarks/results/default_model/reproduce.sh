#!/usr/bin/env bash
# Rebuilds the bundled default model (fastddpm/assets/digits.safetensors) and its figures.
# One process, one thread (the machines here are shared); the weights are bit-identical only
# with the same thread count, torch build and CPU.
#   usage: benchmarks/results/default_model/reproduce.sh [RUN_DIR]   (default: runs/digits)
set -euo pipefail
run_dir="${1:-runs/digits}"
here="$(dirname "$0")"
export OMP_NUM_THREADS=1

fastddpm train --data digits --config digits --out "$run_dir" --steps 5000 --batch-size 64 \
    --lr 4e-4 --warmup 200 --ema-decay 0.999 --save-every 500 --sample-every 2000 --seed 0

# model.pt holds the EMA weights; the package ships them as safetensors (config in the metadata)
python -c "import sys; from fastddpm import checkpoint; \
checkpoint.save(checkpoint.load(sys.argv[1]), 'fastddpm/assets/digits.safetensors')" "$run_dir/model.pt"

fastddpm eval --model default --num 1000 --steps 1000 --sampler ddpm --seed 0 --batch-size 500 \
    --grid "$here/samples.png" > "$here/eval.json"
fastddpm eval --bpd --model default --seed 0 > "$here/bpd.json"
python benchmarks/quality_vs_steps.py --out "$here/quality_vs_steps" --cases \
    ddim:10:leading,ddim:20:leading,ddim:50:leading,ddim:100:leading,ddim:200:leading,dpm++:10:leading,dpm++:20:leading,dpm++:50:leading,ddpm:100:leading,ddpm:1000:leading

# tuned time grids, stored in the asset's metadata (draws of seed 1, apart from the judge's seed 0)
for spec in unipc:4 unipc:5 unipc-bh1:4 unipc-bh1:5 unipc3:5 dpm++:5 dpm++:6; do
    fastddpm tune-steps default --sampler "${spec%:*}" --steps "${spec#*:}" --seed 1 --calib 128 --device cpu
done
# quality against NFE (quality_vs_nfe.md lists the cells it measured; this is the same list)
python benchmarks/quality_vs_steps.py --out "$here/quality_vs_nfe" --plot --cases "$(cat "$here/quality_vs_nfe.cases")"

# the paper's Fig. 8 on digits: held-out pairs (1, 2), (3, 4), ... mixed at x_250 (ᾱ = 0.52; at
# x_500, ᾱ = 0.08, too little of a 16² digit is left for its decode to keep it), then 4× for
# the README
fastddpm sample --from digits --num 8 --interpolate 8 --t 250 --seed 0 --out "$here/interpolation.png"
python -c "import sys; from PIL import Image; im = Image.open(sys.argv[1]); \
im.resize((4 * im.width, 4 * im.height), Image.NEAREST).save(sys.argv[2])" \
    "$here/interpolation.png" "$here/interpolation_4x.png"
