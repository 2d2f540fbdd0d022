"""The benchmark commands end to end at their smallest settings: what they print and write, not how fast it is."""

import importlib
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import datasets
import pytest
import torch
from benchmark_runs import ONE_THREAD, REPOSITORY, run_benchmark, succeeded
from diffusers import DDPMScheduler, StableDiffusionPipeline

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


@pytest.fixture
def text_to_image(monkeypatch):
    """benchmarks/text_to_image_throughput.py as a module; its siblings import each other by name."""
    monkeypatch.syspath_prepend(str(REPOSITORY / "benchmarks"))
    return importlib.import_module("text_to_image_throughput")


def test_the_text_to_image_benchmark_writes_a_pipeline_and_captioned_images_both_trainers_load(
    text_to_image, tmp_path
):
    fixture = importlib.import_module("stable_diffusion_fixture")
    folder = fixture.build_pipeline(tmp_path, "small", 16)
    # As the example loads it (ours loads it as a pipeline); every caption is spelled in known tokens.
    pipeline = StableDiffusionPipeline.from_pretrained(folder)
    assert (
        DDPMScheduler.from_pretrained(folder, subfolder="scheduler").config.beta_schedule == "scaled_linear"
    )
    for caption in fixture.CAPTIONS:
        ids = pipeline.tokenizer(caption, padding="max_length", max_length=77).input_ids
        assert len(ids) == 77 and pipeline.tokenizer.decode(ids, skip_special_tokens=True) == caption
    assert pipeline.unet.config.cross_attention_dim == pipeline.text_encoder.config.hidden_size
    pipeline.set_progress_bar_config(disable=True)
    image = pipeline(fixture.CAPTIONS[0], height=16, width=16, num_inference_steps=1, output_type="pt").images
    assert image.shape == (1, 3, 16, 16) and torch.isfinite(image).all()

    fixture.make_captioned_folder(tmp_path / "images", 6, 16)
    rows = datasets.load_dataset("imagefolder", data_dir=str(tmp_path / "images"), split="train")
    assert sorted(rows["text"]) == sorted(fixture.CAPTIONS[index % 4] for index in range(6))
    assert rows[0]["image"].size == (16, 16)


def flag_values(command: list[str], script: str) -> dict[str, str | bool]:
    """The flags after `script` in a command: `--name value`, or `--name` alone as True."""
    arguments, values = command[command.index(script) + 1 :], {}
    for index, argument in enumerate(arguments):
        if argument.startswith("--"):
            following = arguments[index + 1] if index + 1 < len(arguments) else "--"
            values[argument] = True if following.startswith("--") else following
    return values


def test_the_text_to_image_trainers_run_with_equal_settings(text_to_image, tmp_path):
    example = tmp_path / "train_text_to_image.py"
    example.touch()
    args = text_to_image.parse_arguments(["--example", str(example), "--quick", "--mixed_precision", "bf16"])
    pipeline, images, out = tmp_path / "sd", tmp_path / "images", tmp_path / "out"
    ours = text_to_image.ours_command(args, pipeline, images, out, 30, "stock")
    theirs = text_to_image.example_command(args, pipeline, images, out, 30)
    ours_script = str(REPOSITORY / "train" / "train_text_to_image.py")
    # The same launcher (precision, threads) and the same peak-memory wrapper around both.
    assert ours[: ours.index(ours_script)] == theirs[: theirs.index(str(example))]
    mine, yours = flag_values(ours, ours_script), flag_values(theirs, str(example))
    same_name = (
        "--resolution", "--train_batch_size", "--gradient_accumulation_steps", "--max_train_steps",
        "--learning_rate", "--mixed_precision", "--seed", "--dataloader_num_workers", "--report_to",
        "--checkpointing_steps", "--center_crop", "--output_dir",
    )  # fmt: skip
    assert {flag: mine[flag] for flag in same_name} == {flag: yours[flag] for flag in same_name}
    assert (mine["--pretrained_model"], mine["--dataset"]) == (
        yours["--pretrained_model_name_or_path"],
        yours["--train_data_dir"],
    )
    assert mine["--mixed_precision"] == "bf16" and mine["--gradient_accumulation_steps"] == "1"
    # The stock UNet, EMA in both, no flip, no caption dropout (the example has none), both encoding every step.
    assert mine["--unet"] == "stock" and mine["--caption_dropout"] == "0" and "--no-cache_latents" in mine
    assert yours["--use_ema"] is True and mine["--ema_decay"] == "0.9999"
    assert "--no-random_flip" in mine and "--random_flip" not in yours
    # No validation before the end: the example validates only when given prompts, ours samples only at the end.
    assert "--validation_prompts" not in yours and mine["--sample_every"] == "0"
    assert text_to_image.trainers_of(args) == ("ours", "example")
    cached = flag_values(
        text_to_image.ours_command(args, pipeline, images, out, 30, "stock", True), ours_script
    )
    assert {flag: value for flag, value in cached.items() if "cache_latents" not in flag} == {
        flag: value for flag, value in mine.items() if "cache_latents" not in flag
    }
    assert "--cache_latents" in cached


def test_the_text_to_image_overhead_is_each_trainers_step_over_the_floor_of_its_unet(text_to_image):
    split_time = importlib.import_module("trainer_throughput").split_time

    def trainer(fixed: float, per_step: float, memory: int) -> dict:
        """Two runs, of 10 and 30 steps, whose peak memory grows with their length."""
        runs = []
        for steps in (10, 30):
            seconds = fixed + steps * per_step
            runs.append(
                {"wall_s": seconds, "cpu_s": seconds, "peak_memory": {"max_rss_bytes": memory + steps}}
            )
        return {"runs": runs, **split_time(*runs, 10, 30)}

    repeats = [
        {"ours": trainer(9, 0.55, 100), "example": trainer(8, 0.66, 200), "ours_dia": trainer(9, 0.63, 110)},
        {"ours": trainer(9, 0.5, 100), "example": trainer(8, 0.6, 200), "ours_dia": trainer(9, 0.6, 110)},
        {"ours": trainer(9, 0.45, 100), "example": trainer(8, 0.63, 200), "ours_dia": trainer(9, 0.54, 110)},
    ]
    for repeat in repeats:
        repeat["ours_cached"] = trainer(10, 0.25, 90)
    times = {part: {"wall": [0.1, 0.1], "cpu": [0.1, 0.1]} for part in (*text_to_image.FLOOR_PARTS, "ema")}
    stock = text_to_image.floor_summary([{"times": times}, {"times": times}])
    # The floor is the four parts every step must do; the EMA update is reported beside them, not in it.
    assert stock["cpu_s"] == pytest.approx(0.4) and stock["unet_step"]["cpu_s"] == pytest.approx(0.2)
    floors = {"stock": stock, "dia": {"wall_s": 0.5, "cpu_s": 0.5}}
    summary = text_to_image.summarise(repeats, floors, ("ours", "example", "ours_dia", "ours_cached"))
    assert summary["per_step_cpu_seconds"]["ours"] == pytest.approx(0.5)
    assert summary["overhead"]["ours"]["cpu"] == pytest.approx(0.5 / 0.4 - 1)
    assert summary["overhead"]["ours_dia"]["cpu"] == pytest.approx(0.6 / 0.5 - 1)
    # Encoding once, a step has only the bare UNet step to do.
    assert summary["overhead"]["ours_cached"]["cpu"] == pytest.approx(0.25 / 0.2 - 1)
    assert summary["per_step_ratio"] == pytest.approx(0.63 / 0.5)
    assert summary["per_step_ratio_cpu_per_repeat"] == pytest.approx([1.2, 1.2, 1.4])
    assert summary["dia_per_step_ratio"] == pytest.approx(0.6 / 0.5)
    assert summary["per_step_ratio_ceiling"]["cpu"] == pytest.approx(0.63 / 0.4)
    assert summary["peak_memory"]["example"] == {"max_rss_bytes": 230}


def test_peak_memory_runs_a_script_as_python_would_and_keeps_its_exit_status(tmp_path):
    script = tmp_path / "script.py"
    script.write_text("import sys\nprint(sys.argv, sys.path[0])\nsys.exit(3)\n")
    out = tmp_path / "peak.json"
    result = subprocess.run(
        [sys.executable, "benchmarks/peak_memory.py", str(script), "--flag", "value"],
        cwd=REPOSITORY,
        env={**ONE_THREAD, "PEAK_MEMORY_JSON": str(out)},
        capture_output=True,
        text=True,
    )
    assert result.returncode == 3
    assert result.stdout.strip() == f"{[str(script), '--flag', 'value']} {tmp_path}"
    assert json.loads(out.read_text())["max_rss_bytes"] > 0


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
    assert list(summary["stages"]) == ["wheels", "gpu_tests", "cost", "trainer_throughput", "text_to_image"]
    assert all(stage["exit_status"] == 0 for stage in summary["stages"].values())
    tests = summary["gpu_tests"]
    assert tests["tests"] >= 4 and tests["failures"] == tests["errors"] == 0
    if not torch.cuda.is_available():
        assert tests["skipped"] == tests["tests"]
    assert set(summary["cost_ratios"]) == {"dia_lstm/global"}
    assert set(summary["trainer_throughput"]["fixed_seconds"]) == {"ours", "example"}
    # Ours alone, stock and DIA, each against the bare step of its UNet, with the peak memory of every run.
    text_to_image = summary["text_to_image"]
    assert text_to_image["trainers"] == ["ours", "ours_dia"] and set(text_to_image["floor"]) == {
        "stock",
        "dia",
    }
    assert text_to_image["settings"]["mixed_precision"] == "bf16" and "dia_per_step_ratio" in text_to_image
    assert all(memory["max_rss_bytes"] > 0 for memory in text_to_image["peak_memory"].values())
    assert (tmp_path / "out" / "device_check.log").stat().st_size > 0


def test_device_check_refuses_a_missing_example(tmp_path):
    command = ["bash", "benchmarks/device_check.sh", "--example", str(tmp_path / "absent.py"), "--dry"]
    result = subprocess.run(command, cwd=REPOSITORY, capture_output=True, text=True)
    assert result.returncode == 2 and "absent.py is not a file" in result.stderr
