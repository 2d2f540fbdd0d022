"""quality.py and its statistics: the comparison at its smallest budget end to end, resumed, and the pairing and
interval rules it tabulates by."""

import importlib
import json
import math
import os
import re
import signal
import subprocess
import sys
import time

import pytest
from benchmark_runs import ONE_THREAD, REPOSITORY, run_benchmark, succeeded

from dia_diffusion import DIAUNet2DModel
from dia_diffusion.runtime.file_digests import folder_weights_sha256
from dia_diffusion.training.presets import PRESETS, unet_arguments


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
    assert rows["stock"]["ratio_to_stock_ci95"] == [1, 1] and rows["stock"]["ratio_to_stock_t_ci95"] == [1, 1]
    per_seed = [
        dia / stock for dia, stock in zip(rows["dia-global"]["fd_per_seed"], rows["stock"]["fd_per_seed"])
    ]
    assert rows["dia-global"]["ratio_to_stock_mean"] == pytest.approx(sum(per_seed) / 2)
    assert (tmp_path / "fd_vs_step.png").stat().st_size > 0 and (tmp_path / "samples.png").stat().st_size > 0
    assert "2 seeds (0, 1)" in stdout and "to stock at the same seed" in stdout
    assert (tmp_path / "summary.md").read_text() in stdout
    result = json.loads((tmp_path / "stock" / "seed-0" / "result.json").read_text())
    assert result["train_sittings"] == 1 and result["train_seconds"] > 0

    # A second invocation finds every run finished: nothing is trained or sampled again, the table is the same.
    logs = {path: path.read_text() for path in tmp_path.glob("*/seed-*/benchmark.log")}
    assert len(logs) == 4
    succeeded(run_benchmark("quality.py", *arguments))
    assert {path: path.read_text() for path in logs} == logs
    assert json.loads((tmp_path / "summary.json").read_text())["rows"] == summary["rows"]

    # A retrofit continues each seed's stock model from there, with a training seed of its own, and records it.
    base = tmp_path / "stock" / "seed-0"
    retrofits = tmp_path / "retrofit"
    retrofit = (
        "--budget",
        "retrofit-smoke",
        "--out",
        str(retrofits),
        "--base_out",
        str(tmp_path),
        "--seeds",
        "0",
    )
    succeeded(run_benchmark("quality.py", *retrofit, "--variants", "stock", "dia-global"))
    assert {path: path.read_text() for path in logs} == logs
    base_weights = json.loads((base / "result.json").read_text())["unet_sha256"]
    assert base_weights == folder_weights_sha256(base / "model" / "unet")
    for variant in ("stock", "dia-global"):
        run = retrofits / variant / "seed-0"
        assert json.loads((run / "result.json").read_text())["settings"]["init_unet_sha256"] == base_weights
        command = (run / "benchmark.log").read_text().splitlines()[0]
        assert "--seed 1000 " in command and f"--init_unet {base / 'model'}" in command
    dia = json.loads((retrofits / "dia-global" / "seed-0" / "model" / "unet" / "config.json").read_text())
    assert dia["dia_gate"] == "identity"
    # Both start from what the stock model computes, on the same data and noise: their first logged losses agree.
    (stock_step, stock_loss), (dia_step, dia_loss) = (
        json.loads((retrofits / variant / "seed-0" / "result.json").read_text())["first_logged_loss"]
        for variant in ("stock", "dia-global")
    )
    assert stock_step == dia_step and dia_loss == pytest.approx(stock_loss, rel=1e-4)

    # A cached run is reused only under the settings it was run with.
    record = json.loads((base / "result.json").read_text())
    (base / "result.json").write_text(json.dumps({**record, "settings": {**record["settings"], "steps": 3}}))
    refused = run_benchmark("quality.py", *retrofit, "--variants", "stock")
    assert refused.returncode == 1 and f"{base} was run with other settings (steps)" in refused.stderr


@pytest.fixture
def benchmarks_on_path(monkeypatch):
    """benchmarks/ on the import path, as when a script there runs: its modules import each other by name."""
    monkeypatch.syspath_prepend(str(REPOSITORY / "benchmarks"))


@pytest.fixture
def quality(benchmarks_on_path):
    return importlib.import_module("quality")


@pytest.fixture
def paired_statistics(benchmarks_on_path):
    return importlib.import_module("paired_statistics")


def test_bootstrap_ci_matches_a_hand_computation(paired_statistics):
    # Resampling the 4 seeds of [1, 2, 3, 4]: a mean <= 1.25 has probability (1 + 4) / 4**4 = 2.0 %, a mean <= 1.5
    # (1 + 4 + 10) / 256 = 5.9 %, so the 2.5th percentile is 1.5, and by symmetry the 97.5th is 3.5.
    assert paired_statistics.bootstrap_ci([1, 2, 3, 4]) == [1.5, 3.5]
    assert paired_statistics.bootstrap_ci([3, 1, 4, 2]) == [1.5, 3.5]
    assert paired_statistics.bootstrap_ci([1.0, 1.0, 1.0]) == [1.0, 1.0]
    assert all(math.isnan(bound) for bound in paired_statistics.bootstrap_ci([2.0]))


def test_t_interval_matches_a_hand_computation(paired_statistics):
    # [1, 2, 3, 4]: mean 2.5, standard error sqrt(5/3) / 2, and t(0.975, 3 degrees of freedom) = 3.18245.
    half_width = 3.182446 * math.sqrt(5 / 3) / 2
    assert paired_statistics.t_interval([4, 1, 3, 2]) == pytest.approx(
        [2.5 - half_width, 2.5 + half_width], rel=1e-6
    )
    # Wider than the bootstrap interval of the same 4 values, which only sees their spread.
    assert paired_statistics.t_interval([1, 2, 3, 4])[1] > paired_statistics.bootstrap_ci([1, 2, 3, 4])[1]
    assert all(math.isnan(bound) for bound in paired_statistics.t_interval([2.0]))


def fake_run(variant: str, seed: int, loss: float, num_images: int = 8) -> dict:
    bands = [
        {"band": [0, 500], "timesteps": [250], "loss": loss},
        {"band": [500, 1000], "timesteps": [750], "loss": loss},
    ]
    heldout = {"heldout_loss": loss, "per_band": bands, "dataset": "digits", "split": "test", "seed": 0}
    return {
        "variant": variant, "seed": seed, "fd_classifier": loss, "parameters": 1,
        "heldout": {**heldout, "num_images": num_images},
    }  # fmt: skip


def test_held_out_losses_are_paired_only_when_measured_alike(quality):
    runs = [
        fake_run("stock", 0, 2.0),
        fake_run("stock", 1, 4.0),
        fake_run("dia-global", 0, 1.0),
        fake_run("dia-global", 1, 3.0),
    ]
    dia = quality.summarise(runs)[1]
    assert dia["heldout_ratio_mean"] == pytest.approx((0.5 + 0.75) / 2) and dia["heldout_images"] == 8
    assert [band["ratio_mean"] for band in dia["heldout_band_ratios"]] == pytest.approx([0.625, 0.625])
    runs[3] = fake_run("dia-global", 1, 3.0, num_images=16)
    with pytest.raises(SystemExit, match="measured on different test images"):
        quality.summarise(runs)


def test_class_accuracy_is_paired_with_stock_and_tabulated(quality):
    runs = [
        {**fake_run("stock", 0, 2.0), "class_accuracy": 0.5},
        {**fake_run("stock", 1, 4.0), "class_accuracy": 0.8},
        {**fake_run("dia-global", 0, 1.0), "class_accuracy": 0.6},
        {**fake_run("dia-global", 1, 3.0), "class_accuracy": 0.4},
    ]
    stock, dia = quality.summarise(runs)
    assert dia["class_accuracy_mean"] == pytest.approx(0.5) and dia["class_accuracy_per_seed"] == [0.6, 0.4]
    assert dia["class_accuracy_ratio_mean"] == pytest.approx((1.2 + 0.5) / 2)
    table = quality.table([stock, dia], quality.BUDGETS["class-smoke"], "class-smoke")
    assert "class accuracy ratio to stock" in table and "| 0.500 ± 0.141 | 0.850 [" in table
    unconditional = quality.summarise([fake_run("stock", 0, 2.0)])
    assert "class accuracy" not in quality.table(unconditional, quality.BUDGETS["smoke"], "smoke")


def test_a_class_conditional_budget_trains_and_samples_with_one_guidance(quality):
    budget = quality.BUDGETS["class-fmnist16"]
    assert (
        quality.guidance_scale(budget) == 1.5 and quality.guidance_scale(quality.BUDGETS["fmnist16"]) is None
    )
    command = quality.train_command("dia-timestep", 0, budget, REPOSITORY / "unused")
    assert command[command.index("--guidance_scale") + 1] == "1.5" and "--class_conditional" in command
    assert budget.variants == ("stock", "dia-global", "dia-timestep", "dia-widest-timestep")
    assert (budget.steps, budget.samples, budget.heldout_images) == (4500, 2000, 1000)


def test_a_table_of_unequal_seed_sets_names_each_rows_seeds(quality):
    runs = [fake_run("stock", 0, 2.0), fake_run("stock", 1, 4.0), fake_run("dia-global", 1, 3.0)]
    table = quality.table(quality.summarise(runs), quality.BUDGETS["smoke"], "smoke")
    assert (
        "the seeds each row names" in table
        and "| stock | 0, 1 | 1 |" in table
        and "| dia-global | 1 | 1 |" in table
    )
    table = quality.table(quality.summarise(runs[:2]), quality.BUDGETS["smoke"], "smoke")
    assert "2 seeds (0, 1)" in table and "| stock | 1 |" in table


def test_the_sample_figure_shows_one_seed_every_variant_kept_else_names_each(benchmarks_on_path, tmp_path):
    quality_report = importlib.import_module("quality_report")

    def keep_grids(variant, seed, *steps):
        folder = tmp_path / variant / f"seed-{seed}" / "model" / "samples"
        folder.mkdir(parents=True)
        for step in steps:
            (folder / f"step-{step:07d}.png").write_bytes(b"")

    runs = [fake_run(variant, seed, 1.0) for variant in ("stock", "dia-global") for seed in (0, 1, 2, 3)]
    for seed in (0, 1, 2):
        keep_grids("stock", seed, 500, 1000)
    for seed in (1, 2, 3):
        keep_grids("dia-global", seed, 500)
    seeds = quality_report.sample_grid_seeds(runs, ["stock", "dia-global"], tmp_path)
    assert seeds == {"stock": 1, "dia-global": 1}
    assert quality_report.last_sample_grid(tmp_path, "stock", 1).name == "step-0001000.png"
    # No seed kept by both: each shows its lowest; a variant with no grid left is left out.
    for seed in (1, 2):
        for grid in (tmp_path / "stock" / f"seed-{seed}" / "model" / "samples").iterdir():
            grid.unlink()
    seeds = quality_report.sample_grid_seeds(runs, ["stock", "dia-global", "dia-timestep"], tmp_path)
    assert seeds == {"stock": 0, "dia-global": 1}


def test_a_variant_is_tabulated_only_beside_stock_at_the_same_seed(quality, tmp_path):
    runs = [fake_run("stock", 0, 2.0), fake_run("dia-global", 0, 1.0), fake_run("dia-global", 1, 9.0)]
    dia = quality.summarise(runs)[1]
    assert dia["seeds"] == [0] and dia["fd_per_seed"] == [1.0] and dia["ratio_to_stock_mean"] == 0.5
    with pytest.raises(SystemExit, match="no stock run to pair the variants with"):
        quality.summarise(runs[1:])
    refused = run_benchmark(
        "quality.py", "--budget", "smoke", "--variants", "dia-global", "--out", str(tmp_path)
    )
    assert refused.returncode == 2 and "--variants must include stock" in refused.stderr
    assert not any(tmp_path.iterdir())


def test_a_retrofit_comparison_whose_paired_runs_did_not_start_alike_is_refused(quality):
    def run(variant: str, seed: int, first_logged_loss: tuple[int, float] | None) -> dict:
        logged = {} if first_logged_loss is None else {"first_logged_loss": first_logged_loss}
        return {"variant": variant, "seed": seed, **logged}

    runs = [
        run("stock", 0, (10, 0.0383125)),
        run("dia-global", 0, (10, 0.0383126)),
        run("stock", 1, (10, 0.045)),
    ]
    assert quality.check_paired_starts(runs) == []
    # Runs recorded before the check are named, not refused.
    assert quality.check_paired_starts([*runs, run("dia-global", 1, None)]) == ["dia-global seed 1"]
    # A stock continuation that drew other noise (0.0433 against 0.0383) is refused by name.
    with pytest.raises(SystemExit, match="dia-global and stock at seed 1 did not start alike"):
        quality.check_paired_starts([*runs, run("dia-global", 1, (10, 0.0433))])
    with pytest.raises(SystemExit, match="at step 20 against stock's 0.045 at step 10"):
        quality.check_paired_starts([*runs, run("dia-global", 1, (20, 0.045))])


def test_a_cached_result_counts_only_under_its_own_settings(quality, tmp_path):
    settings = quality.run_settings(quality.BUDGETS["digits8"], None)
    result_file = tmp_path / "result.json"
    result_file.write_text(json.dumps({"fd_classifier": 1.0, "settings": settings}))
    assert quality.cached_result(result_file, settings)["fd_classifier"] == 1.0
    with pytest.raises(SystemExit, match=r"was run with other settings \(dataset, steps\)"):
        quality.cached_result(result_file, {**settings, "steps": 1, "dataset": "fashion_mnist"})
    # Checkpointing does not change what a run computes; results from before the record are taken as they are.
    assert "checkpointing_steps" not in settings and "seeds" not in settings
    result_file.write_text(json.dumps({"fd_classifier": 2.0}))
    assert quality.cached_result(result_file, settings)["fd_classifier"] == 2.0


def test_train_commands_of_the_earlier_budgets_are_unchanged_and_retrofits_start_from_stock(
    quality, tmp_path
):
    command = quality.train_command("dia-global", 2, quality.BUDGETS["cpu"], tmp_path)
    assert command[1:] == [
        "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no",
        "--dynamo_backend", "no", "train/train_ddpm.py", "--preset", "fmnist-32", "--unet", "dia", "--dia_sharing",
        "global", "--seed", "2", "--resolution", "16", "--max_train_steps", "1000", "--train_batch_size", "64",
        "--eval_every", "500", "--eval_num_samples", "200", "--output_dir", str(tmp_path / "model"),
        "--resume_from_checkpoint", "latest", "--learning_rate", "1e-3", "--lr_warmup_steps", "100",
        "--sample_inference_steps", "100",
    ]  # fmt: skip
    retrofit = quality.BUDGETS["retrofit-fmnist16"]
    command = quality.train_command("dia-global", 0, retrofit, tmp_path, init_unet=tmp_path / "stock")
    assert command[command.index("--init_unet") + 1] == str(tmp_path / "stock")
    assert command[command.index("--checkpointing_steps") + 1] == str(retrofit.checkpointing_steps)
    assert retrofit.base == "fmnist16" and retrofit.variants[0] == "stock"
    # A fresh data order and noise for the continuation, the same in every variant.
    assert command[command.index("--seed") + 1] == "1000"


RESUMABLE_SMOKE = """
import dataclasses, sys
sys.path.insert(0, "benchmarks")
import quality
quality.BUDGETS["smoke"] = dataclasses.replace(
    quality.BUDGETS["smoke"], steps=60, checkpointing_steps=10, eval_every=0, heldout_images=8
)
sys.argv = ["quality.py", "--budget", "smoke", "--seeds", "0", "--variants", "stock", "--out", sys.argv[1]]
quality.main()
"""


@pytest.mark.slow
def test_quality_resumes_an_interrupted_run_from_its_last_checkpoint(tmp_path):
    command = [sys.executable, "-c", RESUMABLE_SMOKE, str(tmp_path)]
    run_dir = tmp_path / "stock" / "seed-0"
    checkpoints = run_dir / "model" / "checkpoints"
    interrupted = subprocess.Popen(
        command, cwd=REPOSITORY, env=ONE_THREAD, start_new_session=True, stdout=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 300
    while not (checkpoints / "checkpoint-10").is_dir() and interrupted.poll() is None:
        assert time.monotonic() < deadline, "no checkpoint within 5 minutes"
        time.sleep(0.02)
    os.killpg(
        interrupted.pid, signal.SIGKILL
    )  # the whole process group: quality.py and the training under it
    interrupted.wait()
    assert not (run_dir / "result.json").exists()
    latest = max(int(path.name.split("-")[1]) for path in checkpoints.glob("checkpoint-*"))
    assert 10 <= latest < 60

    stdout = succeeded(
        subprocess.run(command, cwd=REPOSITORY, env=ONE_THREAD, capture_output=True, text=True)
    )
    log = (run_dir / "benchmark.log").read_text()
    assert log.count("train/train_ddpm.py") == 2
    assert re.search(rf"resumed from \S*checkpoint-{latest} at step {latest}\b", log)
    result = json.loads((run_dir / "result.json").read_text())
    # Two sittings: the training's whole wall time is unknown, so none is recorded.
    assert result["train_sittings"] == 2 and result["train_seconds"] is None
    assert result["fd_classifier"] > 0
    assert result["heldout"]["num_images"] == 8 and result["heldout"]["heldout_loss"] > 0
    row = json.loads((tmp_path / "summary.json").read_text())["rows"][0]
    assert row["heldout_ratio_mean"] == 1 and "held-out loss on 8 test images" in stdout
