"""The benchmark commands end to end at their smallest settings: what they print and write, not how fast it is."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dia_diffusion import DIAUNet2DModel
from dia_diffusion.presets import PRESETS, unet_arguments

REPOSITORY = Path(__file__).resolve().parent.parent
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}


def run_benchmark(script: str, *arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, f"benchmarks/{script}", *arguments],
        cwd=REPOSITORY,
        env=ONE_THREAD,
        capture_output=True,
        text=True,
    )


def succeeded(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def test_cost_quick_prints_ratios_to_stock_last(tmp_path):
    out = tmp_path / "cost.json"
    stdout = succeeded(run_benchmark(
        "cost.py", "--quick", "--variants", "stock", "dia_lstm/global", "--rounds", "3", "--sampling_rounds", "1",
        "--ddim_steps", "2", "--warmup", "0", "--json_out", str(out),
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


def test_cost_needs_the_stock_baseline():
    result = run_benchmark("cost.py", "--quick", "--variants", "dia_lstm/global")
    assert result.returncode == 2 and "must include stock" in result.stderr


@pytest.mark.slow
def test_quality_smoke_tabulates_and_resumes_from_cached_runs(tmp_path):
    arguments = ("--budget", "smoke", "--out", str(tmp_path), "--seeds", "0", "1", "--variants", "stock", "dia-global")  # fmt: skip
    stdout = succeeded(run_benchmark("quality.py", *arguments, "--jobs", "2"))
    summary = json.loads((tmp_path / "summary.json").read_text())
    rows = {row["variant"]: row for row in summary["rows"]}
    assert list(rows) == ["stock", "dia-global"] and all(row["seeds"] == [0, 1] for row in rows.values())
    # The parameter count is the trained model's: the demo layout with DIA added.
    demo = PRESETS["demo"].settings["unet_config"]
    dia = DIAUNet2DModel(**unet_arguments(demo, 8, 1))
    assert (
        rows["dia-global"]["parameters"]
        == sum(p.numel() for p in dia.parameters())
        > rows["stock"]["parameters"]
    )
    for row in rows.values():
        assert row["fd_mean"] > 0 and len(row["fd_per_seed"]) == 2
    # The ratio to stock is taken seed by seed: stock's own ratio is exactly 1 with no spread.
    assert rows["stock"]["ratio_to_stock_mean"] == 1 and rows["stock"]["ratio_to_stock_std"] == 0
    per_seed = [
        dia / stock for dia, stock in zip(rows["dia-global"]["fd_per_seed"], rows["stock"]["fd_per_seed"])
    ]
    assert rows["dia-global"]["ratio_to_stock_mean"] == pytest.approx(sum(per_seed) / 2)
    assert (tmp_path / "fd_vs_step.png").stat().st_size > 0 and (tmp_path / "samples.png").stat().st_size > 0
    assert "vs stock, same seed" in stdout

    # A second invocation finds every run finished: nothing is trained or sampled again, the table is the same.
    logs = {path: path.read_text() for path in tmp_path.glob("*/seed-*/benchmark.log")}
    assert len(logs) == 4
    succeeded(run_benchmark("quality.py", *arguments))
    assert {path: path.read_text() for path in logs} == logs
    assert json.loads((tmp_path / "summary.json").read_text())["rows"] == summary["rows"]
