#!/usr/bin/env bash
# The GPU check: one command that fits in 8 minutes on one GPU, start to finish.
#
#   bash benchmarks/device_check.sh --example PATH/train_unconditional.py --wheels DIR --out DIR
#   bash benchmarks/device_check.sh --example PATH/train_unconditional.py --out DIR --dry   # the same on the CPU, tiny
#   bash benchmarks/device_check.sh --fetch_wheels DIR   # once, where pip can download: the wheels to carry
#
# Stages, each under its own time limit, each run even when an earlier one failed:
#   1. the carried wheels (diffusers, datasets and the dependencies a GPU image lacks, pinned by constraints.txt)
#      installed for this machine's python3 into a folder on PYTHONPATH;
#   2. the `gpu`-marked tests (bf16 autocast training, torch.compile with inductor, fp16 sampling, the training
#      command in bf16 with compile);
#   3. benchmarks/cost.py on CUDA in bf16 with torch.compile and channels_last: stock vs default DIA, DDPM layout;
#   4. benchmarks/trainer_throughput.py on the DDPM layout: train_ddpm.py (bf16, --compile) against diffusers'
#      example at its best flags (bf16);
#   5. benchmarks/text_to_image_throughput.py: train_text_to_image.py fine-tunes a small SD-layout pipeline (its
#      `medium` layout, 128x128 pixels, batch 32, bf16, eager) with the stock UNet and with DIA, runs of 20 and 200
#      steps: time per step, fixed time and peak CUDA memory of both, and the bare step (VAE and text encoding, UNet
#      forward, backward and AdamW) of each UNet, with its peak memory, in the benchmark's own process.
# Time limits (s): wheels 20, tests 65, cost 100, trainers 180, text-to-image 115: 480 in all, the 8 minutes.
# Estimated needs (not yet measured on a GPU): about 10, 60, 95, 175 and 105 s. The text-to-image stage took its
# 115 s from the others: the wheels' limit went from 45 to 20 s (five wheels, no dependencies resolved), the tests'
# from 100 to 65, the cost's from 135 to 100 (12 rounds after 2 warm-up ones, not 20 after 3) and the trainers'
# from 195 to 180 (the long run 8 epochs, not 12).
# OUT/device_check.json gathers every result and each stage's exit status and seconds; OUT/device_check.log holds
# the output. The exit status is that of the first failed stage (0 when all passed).
set -uo pipefail

REPOSITORY=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-python3}
# The GPU machines' python3 is 3.12; the wheels are pure Python except multiprocess, which is built per version.
WHEEL_PYTHON_VERSION=3.12
WHEEL_PACKAGES=(diffusers datasets dill multiprocess importlib_metadata)

usage() {
    echo "usage: $0 --example PATH [--wheels DIR] [--out DIR] [--dry] | --fetch_wheels DIR" >&2
    exit 2
}

dry=0 example="" wheels="" out="" fetch=""
while (($#)); do
    case $1 in
        --dry) dry=1 ;;
        --example) example=${2:-} && shift ;;
        --wheels) wheels=${2:-} && shift ;;
        --out) out=${2:-} && shift ;;
        --fetch_wheels) fetch=${2:-} && shift ;;
        *) usage ;;
    esac
    shift
done

if [[ -n $fetch ]]; then
    pins=()
    for package in "${WHEEL_PACKAGES[@]}"; do
        pin=$(grep -i "^${package}==" "$REPOSITORY/constraints.txt") || { echo "$0: $package is not pinned in constraints.txt" >&2; exit 2; }
        pins+=("$pin")
    done
    exec "$PYTHON" -m pip download --no-deps --only-binary=:all: --python-version "$WHEEL_PYTHON_VERSION" \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d "$fetch" "${pins[@]}"
fi

[[ -n $example ]] || usage
[[ -f $example ]] || { echo "$0: --example $example is not a file" >&2; exit 2; }
if [[ -n $wheels ]] && ! compgen -G "$wheels/*.whl" > /dev/null; then
    echo "$0: --wheels $wheels holds no .whl files" >&2
    exit 2
fi
out=${out:-$REPOSITORY/runs/device-check}
mkdir -p "$out"
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
log=$out/device_check.log
: > "$log"
stages=$scratch/stages.tsv

export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1
# One compile cache for every stage: the trainer's runs after the first reuse its kernels.
export TORCHINDUCTOR_CACHE_DIR=$scratch/inductor-cache
export PYTHONPATH=$REPOSITORY${PYTHONPATH:+:$PYTHONPATH}

# run_stage NAME SECONDS COMMAND...: runs COMMAND under a time limit, appends its output to the log.
run_stage() {
    local name=$1 limit=$2 start=$SECONDS status
    shift 2
    echo "== $name: $*" | tee -a "$log"
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$log"
    status=${PIPESTATUS[0]}
    printf '%s\t%s\t%s\n' "$name" "$status" "$((SECONDS - start))" >> "$stages"
    echo "== $name: exit $status after $((SECONDS - start)) s" | tee -a "$log"
}

if [[ -n $wheels ]]; then
    run_stage wheels 20 "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$scratch/site" "$wheels"/*.whl
    export PYTHONPATH=$PYTHONPATH:$scratch/site
fi

if ((dry)); then
    cost_flags=(--quick --device cpu --rounds 2 --sampling_rounds 1 --ddim_steps 2 --warmup 0)
    throughput_flags=(--quick --resolution 8 --batch_size 2 --steps_per_epoch 2 --epochs 2 3 --repeats 1)
    text_to_image_flags=(--layout small --resolution 16 --batch_size 2 --batches 2 --steps 2 4 --floor_steps 2)
    # Only a guard against a hang: a CPU shared with other jobs can be many times slower than a quiet one.
    limits=(1800 1800 1800 1800)
else
    # Sampling would compile each model a second time (eval mode): the train step is what the 8 minutes allow.
    cost_flags=(--device cuda --dtype bfloat16 --compile --channels_last --batch_size 128 --rounds 12 --warmup 2
        --sampling_rounds 0)
    # One untimed run of ours first fills the compile cache, so that no timed run compiles from scratch.
    throughput_flags=(--batch_size 128 --steps_per_epoch 8 --epochs 2 8 --repeats 1 --warmup 1
        --mixed_precision bf16 --ours_args=--compile)
    # Eager, as a user starts: 200 extra steps resolve the time per step to a few percent; the bare steps measured
    # in-process give the DIA/stock ratio of the UNet itself more precisely.
    text_to_image_flags=(--layout medium --resolution 128 --batch_size 32 --batches 8 --steps 20 200
        --floor_steps 20)
    # With the wheels' 20 s the limits add up to 8 minutes (see the header).
    limits=(65 100 180 115)
fi

run_stage gpu_tests "${limits[0]}" "$PYTHON" -m pytest -q -m gpu -p no:cacheprovider \
    --junitxml "$out/gpu-tests.xml" "$REPOSITORY/tests"
run_stage cost "${limits[1]}" "$PYTHON" "$REPOSITORY/benchmarks/cost.py" "${cost_flags[@]}" \
    --variants stock dia_lstm/global --json_out "$out/cost.json"
run_stage trainer_throughput "${limits[2]}" "$PYTHON" "$REPOSITORY/benchmarks/trainer_throughput.py" \
    --example "$example" "${throughput_flags[@]}" --work_dir "$scratch/throughput" --json_out "$out/throughput.json"
run_stage text_to_image "${limits[3]}" "$PYTHON" "$REPOSITORY/benchmarks/text_to_image_throughput.py" --dia \
    --mixed_precision bf16 --repeats 1 "${text_to_image_flags[@]}" --work_dir "$scratch/text-to-image" \
    --json_out "$out/text_to_image.json"

"$PYTHON" - "$out" "$stages" "$dry" <<'EOF'
"""Gathers the stages' results into OUT/device_check.json and exits with the first failed stage's status."""
import json
import platform
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import torch

out, stages_file, dry = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3] == "1"
stages = {}
for line in stages_file.read_text().splitlines():
    name, status, seconds = line.split("\t")
    stages[name] = {"exit_status": int(status), "seconds": int(seconds)}


def read_json(name):
    path = out / name
    return json.loads(path.read_text()) if path.is_file() else None


tests = None
if (out / "gpu-tests.xml").is_file():
    suite = ElementTree.parse(out / "gpu-tests.xml").getroot()
    suite = suite.find("testsuite") if suite.tag == "testsuites" else suite
    tests = {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")}
cost = read_json("cost.json")
throughput = read_json("throughput.json")
text_to_image = read_json("text_to_image.json")
summary = {
    "dry": dry,
    "machine": {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.machine(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    },
    "stages": stages,
    "gpu_tests": tests,
    "cost_ratios": cost and cost["ratios"],
    "cost_results": cost and cost["results"],
    "trainer_throughput": throughput and {key: value for key, value in throughput.items() if key != "repeats"},
    "text_to_image": text_to_image and {key: value for key, value in text_to_image.items() if key != "repeats"},
}
(out / "device_check.json").write_text(json.dumps(summary, indent=2) + "\n")
print(json.dumps({name: stage["exit_status"] for name, stage in stages.items()}))
failed = [stage["exit_status"] for stage in stages.values() if stage["exit_status"] != 0]
sys.exit(failed[0] if failed else 0)
EOF
