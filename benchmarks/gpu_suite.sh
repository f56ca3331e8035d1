#!/usr/bin/env bash
# The GPU suite, for a machine with a CUDA device: the GPU tests (`pytest -m gpu`), then the
# benchmark suites with --benchmark-json; results land in benchmarks/results/gpu-<UTC stamp>/
# and, when $OUT is set (the device machine's return folder), are copied there too:
#   environment.md   device, driver, torch / triton versions, date
#   tests.txt        the GPU tests' output
#   <name>.json      pytest-benchmark JSON per suite;  <name>.txt  its console output
#   summary.md       one markdown table per suite from the JSON (extra_info columns included)
# Usage: benchmarks/gpu_suite.sh [tests] [kernels] [sampler]     (no names: all, in that order)
# Wheels in .whl/ (benchmarks/gpu_wheels.sh fetches diffusers there) are installed first.
# Exit status: non-zero if the GPU tests or any benchmark suite failed (all still run).
set -uo pipefail
cd "$(dirname "$0")/.."

# One line per benchmark suite: "<name> <pytest target>". Add a suite by adding a line.
SUITES=(
  "kernels benchmarks/bench_kernels.py"
  "sampler benchmarks/bench_sampler.py"
)
wanted=" ${*:-tests kernels sampler} "

python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" || {
  echo "gpu_suite.sh: no CUDA device here; the GPU figures stay pending" >&2; exit 2; }

if compgen -G ".whl/*.whl" > /dev/null; then  # carried wheels: the machine has no network
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
# the package maps kernels/ and export/ into fastddpm.*: install it (offline, no dependencies)
python3 -c "import fastddpm.kernels" 2>/dev/null || python3 -m pip install -q --no-deps \
  --no-build-isolation -e . || { echo "gpu_suite.sh: cannot install fastddpm here" >&2; exit 2; }

stamp=$(date -u +%Y%m%dT%H%M%SZ)
dest="benchmarks/results/gpu-$stamp"
mkdir -p "$dest"
status=0

python3 - > "$dest/environment.md" <<'PY'
import datetime, platform, subprocess
import torch
try:
    import triton
    triton_version = triton.__version__
except ImportError:
    triton_version = "not installed"
props = torch.cuda.get_device_properties(0)
driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                        capture_output=True, text=True).stdout.strip() or "unknown"
print("| | |\n|---|---|")
for key, value in [
    ("device", f"{props.name} ({props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} SMs)"),
    ("driver", driver), ("CUDA (torch build)", torch.version.cuda), ("torch", torch.__version__),
    ("triton", triton_version), ("python", platform.python_version()),
    ("date (UTC)", datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M")),
]:
    print(f"| {key} | {value} |")
PY

if [[ $wanted == *" tests "* ]]; then
  python3 -m pytest -m gpu -q -rs tests 2>&1 | tee "$dest/tests.txt"
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
fi

for suite in "${SUITES[@]}"; do
  name=${suite%% *}
  target=${suite#* }
  [[ $wanted == *" $name "* ]] || continue
  python3 -m pytest "$target" -q -rs --benchmark-json="$dest/$name.json" 2>&1 | tee "$dest/$name.txt"
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
done

python3 benchmarks/summarize.py "$dest" > "$dest/summary.md"

if [ -n "${OUT:-}" ]; then
  mkdir -p "$OUT" && cp -r "$dest" "$OUT/"
fi
echo "gpu_suite.sh: results in $dest${OUT:+ and $OUT/$(basename "$dest")}"
exit "$status"
