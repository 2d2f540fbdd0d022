"""The benchmark commands end to end at their smallest settings: what they print and write, not how fast it is."""

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from benchmark_runs import ONE_THREAD, REPOSITORY, run_benchmark, succeeded

STAND_IN_STEP_CPU_SECONDS = 0.2
# Stands in for diffusers' train_unconditional.py: it takes the same flags and costs a known CPU time per step.
STAND_IN_EXAMPLE = f"""
import argparse, math, pathlib, time
parser = argparse.ArgumentParser()
for flag in ("--train_data_dir", "--output_dir"):
    parser.add_argument(flag)
for flag in ("--train_batch_size", "--num_epochs"):
    parser.add_argument(flag, type=int)
args, _ = parser.parse_known_args()
images = len(list(pathlib.Path(args.train_data_dir).glob("*.png")))
for _ in range(math.ceil(images / args.train_batch_size) * args.num_epochs):
    end = time.process_time() + {STAND_IN_STEP_CPU_SECONDS}
    while time.process_time() < end:
        pass
pathlib.Path(args.output_dir).mkdir(parents=True)
"""


def stand_in_example(folder: Path) -> Path:
    script = folder / "train_unconditional.py"
    script.write_text(STAND_IN_EXAMPLE)
    return script


def test_cost_quick_prints_ratios_to_stock_last(tmp_path):
    out = tmp_path / "cost.json"
    stdout = succeeded(run_benchmark(
        "cost.py", "--quick", "--variants", "stock", "dia_lstm/global", "--rounds", "3", "--sampling_rounds", "1",
        "--ddim_steps", "2", "--warmup", "0", "--dtype", "float32", "bfloat16", "--matmul_size", "256",
        "--json_out", str(out),
    ))  # fmt: skip
    ratios = json.loads(stdout.strip().splitlines()[-1])
    full = json.loads(out.read_text())
    assert set(ratios) == {"dia_lstm/global"} and ratios == full["ratios"]
    stock, dia = full["results"]["stock"], full["results"]["dia_lstm/global"]
    assert ratios["dia_lstm/global"]["parameters"] == pytest.approx(dia["parameters"] / stock["parameters"])
    # The shared attention module adds parameters and saved activations; the times are positive measurements.
    assert dia["parameters"] > stock["parameters"] and dia["memory_bytes"] > stock["memory_bytes"]
    # Each round's ratio compares that round's steps; the spread summarises them, in wall and CPU time.
    for clock in ("", "_cpu"):
        per_round = [
            mine / theirs
            for mine, theirs in zip(dia[f"train_step_rounds{clock}_s"], stock[f"train_step_rounds{clock}_s"])
        ]
        spread = ratios["dia_lstm/global"][f"train_step_time{clock}_per_round"]
        assert len(per_round) == 3 and spread["min"] == min(per_round) and spread["max"] == max(per_round)
        assert spread["min"] <= spread["q1"] <= spread["median"] <= spread["q3"] <= spread["max"]
        assert spread["median"] == pytest.approx(sorted(per_round)[1])
    # Achieved FLOP/s of the step (torch's FLOP counter) against a matmul of the same dtype timed in the same rounds.
    for dtype, table in full["precisions"].items():
        assert len(table["matmul_rounds_s"]) == 3 and table["matmul_flop_per_s"] > 0
        for variant, row in table["variants"].items():
            flops = full["results"][variant]["train_step_flops"]
            assert row["train_step_flop_per_s"] == pytest.approx(flops / row["train_step_s"])
            assert row["fraction_of_matmul"] == pytest.approx(
                row["train_step_flop_per_s"] / table["matmul_flop_per_s"]
            )
            assert ("speedup_over_float32_per_round" in row) == (dtype == "bfloat16")
    assert dia["train_step_flops"] > stock["train_step_flops"] > 0
    assert (
        dia["fraction_of_matmul"]
        == full["precisions"]["float32"]["variants"]["dia_lstm/global"]["fraction_of_matmul"]
    )


def test_cost_needs_the_stock_baseline():
    result = run_benchmark("cost.py", "--quick", "--variants", "dia_lstm/global")
    assert result.returncode == 2 and "must include stock" in result.stderr


@pytest.mark.slow
def test_correlation_benchmark_trains_a_variant_once_and_tabulates_the_report_keys(tmp_path):
    arguments = (
        "--budget",
        "smoke",
        "--out",
        str(tmp_path),
        "--num_images",
        "4",
        "--variants",
        "dia-timestep",
    )
    stdout = succeeded(run_benchmark("correlation.py", *arguments))
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [row["variant"] for row in summary["rows"]] == ["dia-timestep"]
    for row in summary["rows"]:
        report = json.loads((tmp_path / row["variant"] / "correlation.json").read_text())
        assert row["mean_r_aligned_pairs"] == report["mean_r_aligned_pairs"]
        assert row["timestep_variation_mean"] == report["timestep_variation_mean"] > 0
    config = json.loads((tmp_path / "dia-timestep" / "model" / "unet" / "config.json").read_text())
    assert config["dia_condition"] == "timestep"
    assert "r aligned" in stdout
    # Finished variants are reused, not trained or analysed again.
    logs = {path: path.read_text() for path in tmp_path.glob("*/benchmark.log")}
    succeeded(run_benchmark("correlation.py", *arguments))
    assert {path: path.read_text() for path in logs} == logs


def test_trainer_throughput_separates_the_time_per_step_from_the_fixed_time(tmp_path):
    arguments = (
        "--example", str(stand_in_example(tmp_path)), "--quick", "--resolution", "8", "--batch_size", "2",
        "--steps_per_epoch", "4", "--epochs", "2", "6", "--repeats", "1", "--json_out", str(tmp_path / "out.json"),
    )  # fmt: skip
    stdout = succeeded(run_benchmark("trainer_throughput.py", *arguments))
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary == json.loads((tmp_path / "out.json").read_text())
    # The stand-in's known cost per step comes back from the difference of its two lengths (8 and 24 steps).
    assert summary["per_step_cpu_seconds"]["example"] == pytest.approx(STAND_IN_STEP_CPU_SECONDS, rel=0.35)
    per_step = summary["per_step_seconds"]
    assert summary["per_step_ratio"] == pytest.approx(per_step["example"] / per_step["ours"])
    assert set(summary["fixed_seconds"]) == {"ours", "example"} and summary["fixed_seconds"]["ours"] > 0
    # The ceiling divides the example's step by the bare UNet's forward and backward at the same sizes.
    alone = summary["unet_alone_seconds"]
    assert alone["cpu_s"] > 0 and alone["wall_s"] > 0
    assert summary["per_step_ratio_ceiling"]["cpu"] == pytest.approx(
        summary["per_step_cpu_seconds"]["example"] / alone["cpu_s"]
    )
    (repeat,) = summary["repeats"]
    assert [len(repeat[trainer]["runs"]) for trainer in ("ours", "example")] == [2, 2]
    assert "per-step ratio example/ours" in stdout


def test_trainer_throughput_needs_two_lengths_of_at_least_two_epochs(tmp_path):
    example = str(stand_in_example(tmp_path))
    result = run_benchmark("trainer_throughput.py", "--example", example, "--quick", "--epochs", "1", "3")
    assert result.returncode == 2 and "--epochs" in result.stderr


def probe_wheel(folder: Path) -> None:
    """The smallest installable wheel: lets the dry run rehearse the install of carried wheels."""
    folder.mkdir()
    with zipfile.ZipFile(folder / "device_check_probe-1.0-py3-none-any.whl", "w") as wheel:
        wheel.writestr("device_check_probe/__init__.py", "")
        info = "device_check_probe-1.0.dist-info"
        wheel.writestr(f"{info}/METADATA", "Metadata-Version: 2.1\nName: device_check_probe\nVersion: 1.0\n")
        wheel.writestr(
            f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        )
        wheel.writestr(f"{info}/RECORD", "")


@pytest.mark.slow
def test_device_check_dry_run_gathers_every_stage(tmp_path):
    probe_wheel(tmp_path / "wheels")
    command = [
        "bash", "benchmarks/device_check.sh", "--dry", "--example", str(stand_in_example(tmp_path)),
        "--wheels", str(tmp_path / "wheels"), "--out", str(tmp_path / "out"),
    ]  # fmt: skip
    environment = {**ONE_THREAD, "PYTHON": sys.executable}
    result = subprocess.run(command, cwd=REPOSITORY, env=environment, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:]
    summary = json.loads((tmp_path / "out" / "device_check.json").read_text())
    assert summary["dry"] is True
    assert list(summary["stages"]) == ["wheels", "gpu_tests", "cost", "trainer_throughput"]
    assert all(stage["exit_status"] == 0 for stage in summary["stages"].values())
    tests = summary["gpu_tests"]
    assert tests["tests"] >= 4 and tests["failures"] == tests["errors"] == 0
    if not torch.cuda.is_available():
        assert tests["skipped"] == tests["tests"]
    assert set(summary["cost_ratios"]) == {"dia_lstm/global"}
    assert set(summary["trainer_throughput"]["fixed_seconds"]) == {"ours", "example"}
    assert (tmp_path / "out" / "device_check.log").stat().st_size > 0


def test_device_check_refuses_a_missing_example(tmp_path):
    command = ["bash", "benchmarks/device_check.sh", "--example", str(tmp_path / "absent.py"), "--dry"]
    result = subprocess.run(command, cwd=REPOSITORY, capture_output=True, text=True)
    assert result.returncode == 2 and "absent.py is not a file" in result.stderr
