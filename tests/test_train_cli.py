"""train/train_ddpm.py: every bad input ends in one stderr line, exit status 2 and an untouched --output_dir;
and the script, run as a user runs it, leaves a pipeline that a fresh process loads after `import dia_diffusion`."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import PIL.Image
import pytest

from dia_diffusion.checkpointing import write_run_record
from dia_diffusion.training import resolve_config, run_record

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "train" / "train_ddpm.py"

pytestmark = pytest.mark.usefixtures("isolated_run")


def load_script():
    spec = importlib.util.spec_from_file_location("train_ddpm", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def script():
    return load_script()


def write_png(path: Path, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    PIL.Image.fromarray(np.full((8, 8), value, dtype=np.uint8)).save(path)


def run_script(script, capsys, output_dir: Path, *flags: str) -> tuple[int, str]:
    try:
        code = script.main(
            ["--output_dir", str(output_dir), "--max_train_steps", "1", "--eval_every", "0", *flags]
        )
    except SystemExit as exit_request:  # argparse's way out for a flag it cannot parse
        code = exit_request.code
    return code, capsys.readouterr().err


def assert_one_line_error(code: int, stderr: str, expected: str) -> None:
    assert code == 2
    assert stderr.count("\n") == 1 and stderr.startswith("train_ddpm.py: error: "), stderr
    assert expected in stderr
    assert "Traceback" not in stderr


def corrupt_image_folder(root: Path) -> Path:
    write_png(root / "good.png", 128)
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png")
    return root


def truncated_jpeg_folder(root: Path) -> Path:
    """Whole JPEGs and one cut short: PIL's structure check passes it, decoding it fails."""
    root.mkdir(parents=True)
    noise = np.random.default_rng(0).integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
    for index in range(3):
        PIL.Image.fromarray(noise).save(root / f"whole-{index}.jpg")
    whole = (root / "whole-0.jpg").read_bytes()
    (root / "cut.jpg").write_bytes(whole[: len(whole) // 2])
    return root


def saved_dataset_with_img_column(root: Path) -> Path:
    images = [PIL.Image.fromarray(np.full((8, 8), 10 * index, dtype=np.uint8)) for index in range(4)]
    features = datasets.Features({"img": datasets.Image()})
    datasets.Dataset.from_dict({"img": images}, features=features).save_to_disk(str(root))
    return root


BAD_INPUTS = {
    "missing dataset path": (
        lambda tmp: ["--dataset", str(tmp / "no" / "such" / "folder")],
        "does not exist",
    ),
    "empty folder": (lambda tmp: ["--dataset", str((tmp / "empty").resolve())], "contains no image files"),
    "corrupt image": (lambda tmp: ["--dataset", str(corrupt_image_folder(tmp / "images"))], "broken.png"),
    "truncated jpeg": (
        lambda tmp: ["--dataset", str(truncated_jpeg_folder(tmp / "photos")), "--train_batch_size", "2"],
        "cut.jpg' is corrupt",
    ),
    "unknown preset": (lambda tmp: ["--preset", "cifar100-ddpm"], "unknown --preset 'cifar100-ddpm'"),
    "hub dataset offline": (lambda tmp: ["--dataset", "someone/some-images"], "cannot be loaded"),
    "image column not found": (
        lambda tmp: [
            "--dataset",
            str(saved_dataset_with_img_column(tmp / "saved")),
            "--image_column",
            "picture",
        ],
        "no column 'picture'",
    ),
    "resolution the UNet cannot divide": (
        lambda tmp: ["--resolution", "9"],
        "--resolution 9 cannot be divided by 2",
    ),
    "unknown unet variant": (lambda tmp: ["--unet", "transformer"], "--unet must be one of"),
    "unparsable number": (lambda tmp: ["--learning_rate", "fast"], "invalid float value: 'fast'"),
    "invalid DIA option": (lambda tmp: ["--dia_sharing", "everywhere"], "dia_sharing must be one of"),
    "unknown metric feature": (
        lambda tmp: ["--eval_every", "1", "--eval_feature", "lpips"],
        "--eval_feature lpips",
    ),
    "missing checkpoint": (
        lambda tmp: ["--resume_from_checkpoint", str(tmp / "checkpoint-9")],
        "does not exist",
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_line_and_writes_nothing(case, script, capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    (tmp_path / "empty").mkdir()
    flags, expected = BAD_INPUTS[case]
    output_dir = tmp_path / "run"
    arguments = flags(tmp_path)
    capsys.readouterr()  # progress bars of building the input
    code, stderr = run_script(script, capsys, output_dir, *arguments)
    assert_one_line_error(code, stderr, expected)
    assert not output_dir.exists()


def test_output_dir_of_another_run_is_refused_and_left_alone(script, capsys, tmp_path):
    output_dir = tmp_path / "run"
    other = resolve_config("demo", {"output_dir": str(output_dir), "seed": 7})
    write_run_record(output_dir, run_record(other, num_processes=1))
    before = (output_dir / "training_config.json").read_text()

    code, stderr = run_script(script, capsys, output_dir)
    assert_one_line_error(code, stderr, "holds a different run (seed: 7 there, 0 now)")
    assert sorted(path.name for path in output_dir.iterdir()) == ["training_config.json"]
    assert (output_dir / "training_config.json").read_text() == before


def test_list_presets(script, capsys):
    assert script.main(["--list_presets"]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in listed] == ["demo", "fmnist-32", "cifar10-ddpm"]


@pytest.mark.slow
def test_script_run_as_a_user_runs_it(tmp_path):
    """A subprocess, as `python train/train_ddpm.py` runs; then a fresh process loads the result."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    bad = subprocess.run(
        [sys.executable, str(SCRIPT), "--dataset", str(tmp_path / "missing"), "--output_dir", str(tmp_path / "bad")],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [
        f"train_ddpm.py: error: dataset path '{tmp_path / 'missing'}' does not exist"
    ]

    run_dir = tmp_path / "run"
    flags = ["--output_dir", str(run_dir), "--max_train_steps", "2", "--train_batch_size", "8", "--eval_every", "0",
             "--num_sample_images", "4", "--sample_inference_steps", "2", "--logger", "none"]  # fmt: skip
    trained = subprocess.run(
        [sys.executable, str(SCRIPT), *flags], env=env, capture_output=True, text=True, timeout=300
    )
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert "effective batch size 8" in trained.stdout

    load = "import dia_diffusion, sys; from diffusers import DDPMPipeline; p = DDPMPipeline.from_pretrained(sys.argv[1]); print(type(p.unet).__name__, p.unet.config.sample_size)"
    loaded = subprocess.run(
        [sys.executable, "-c", load, str(run_dir)], env=env, capture_output=True, text=True, timeout=120
    )
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    assert loaded.stdout.split() == ["DIAUNet2DModel", "8"]
