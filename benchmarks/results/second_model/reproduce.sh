#!/usr/bin/env bash
# A second digits model, to check whether the bundled model's few-step findings carry over: the
# same U-Net and data, another seed, the cosine schedule (Nichol & Dhariwal) instead of the
# linear one, and 2,000 training steps instead of 5,000. One thread (the machines are shared).
#   usage: benchmarks/results/second_model/reproduce.sh [RUN_DIR]   (default: runs/digits-cosine)
set -euo pipefail
run_dir="${1:-runs/digits-cosine}"
here="$(dirname "$0")"
export OMP_NUM_THREADS=1

# `fastddpm train` has no schedule flag: the schedule is a TrainConfig field
python - "$run_dir" <<'PY'
import sys
from fastddpm.schedule import ScheduleConfig
from fastddpm.train import Trainer, TrainConfig
Trainer(TrainConfig(data="digits", out=sys.argv[1], config="digits", steps=2000, batch_size=64,
                    lr=4e-4, warmup=200, ema_decay=0.999, seed=1, sample_every=0, save_every=1000,
                    schedule=ScheduleConfig(kind="cosine").to_dict(), device="cpu")).run()
PY
cells=ipndm2:4:trailing,ipndm2:5:trailing,unipc:4:trailing,unipc:10:trailing,ddim:20:trailing,ipndm2:6:trailing,unipc-bh1:5:trailing,unipc:5:trailing,dpm++:5:trailing,ipndm3:4:trailing,ddim:10:trailing,ddpm:1000:trailing
python benchmarks/quality_vs_steps.py --model "$run_dir/model.pt" --cases "$cells" --out "$here/quality_vs_nfe"
# tuned grids as the bundled model's were made (draws of seed 1; the judge samples seed 0)
for spec in unipc:4 unipc:5; do
    fastddpm tune-steps "$run_dir/model.pt" --sampler "${spec%:*}" --steps "${spec#*:}" --seed 1 --calib 128 --device cpu
done
python benchmarks/quality_vs_steps.py --model "$run_dir/model.pt" --out "$here/quality_vs_nfe" \
    --cases unipc:4:tuned,unipc:5:tuned,unipc:20:trailing,ddim:50:trailing,ddpm:100:trailing,ddpm:50:trailing
