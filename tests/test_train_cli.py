"""train/train_ddpm.py: every bad input ends in one stderr line, exit status 2 and an untouched --output_dir; a stop
(Ctrl-C, SIGTERM, the launcher's death) ends in one line, 128 + the signal, and the last checkpoint intact; one
training at a time per folder; and the script, run as a user runs it, leaves a pipeline that a fresh process loads
after `import dia_diffusion`."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import datasets
import numpy as np
import PIL.Image
import pytest
from accelerate import Accelerator
from conftest import load_script

from dia_diffusion.runtime.folder_lock import lock_folder
from dia_diffusion.training import step as training_steps
from dia_diffusion.training.checkpointing import (
    CHECKPOINT_STEP_FILENAME,
    checkpoint_step,
    find_latest_checkpoint,
    write_run_record,
)
from dia_diffusion.training.config import resolve_config, run_record

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "train" / "train_ddpm.py"
# One process under accelerate's launcher, as `accelerate launch --quiet ...` runs it.
ACCELERATE_LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--quiet", "--num_processes", "1",
                     "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]  # fmt: skip

pytestmark = pytest.mark.usefixtures("isolated_run")


@pytest.fixture(scope="module")
def script():
    return load_script("train/train_ddpm.py")


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


def checkpoint_of_another_run(root: Path) -> Path:
    """A checkpoint folder whose run record says seed 7 (no weights: the record refuses it first)."""
    checkpoint = root / "checkpoints" / "checkpoint-3"
    other = resolve_config("demo", {"output_dir": str(root), "seed": 7})
    write_run_record(checkpoint, run_record(other, num_processes=1))
    (checkpoint / CHECKPOINT_STEP_FILENAME).write_text(json.dumps({"global_step": 3}))
    return checkpoint


def folder_with_broken_record(root: Path) -> Path:
    root.mkdir(parents=True)
    (root / "training_config.json").write_text('{"seed": 0, "unet": ')
    return root


def a_file(path: Path) -> Path:
    path.write_text("not a folder")
    return path


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
    "text-to-image preset": (
        lambda tmp: ["--preset", "sd-finetune"],
        "--preset sd-finetune fine-tunes a pretrained Stable Diffusion: use train/train_text_to_image.py",
    ),
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
    "checkpoint of another run": (
        lambda tmp: ["--resume_from_checkpoint", str(checkpoint_of_another_run(tmp / "other"))],
        "belongs to a different run (seed: 7 there, 0 now)",
    ),
    "output dir inside a file": (
        lambda tmp: ["--output_dir", str(a_file(tmp / "file") / "run")],
        "cannot be written: Not a directory",
    ),
    "unreadable run record": (
        lambda tmp: ["--output_dir", str(folder_with_broken_record(tmp / "broken"))],
        "training_config.json' is not a readable run record",
    ),
    "seed numpy cannot take": (lambda tmp: ["--seed", "-1"], "--seed must be between 0 and 4294967295"),
    "schedule that needs rules no flag sets": (
        lambda tmp: ["--lr_scheduler", "piecewise_constant"],
        "--lr_scheduler must be one of",
    ),
    "more sampling steps than timesteps": (
        lambda tmp: ["--sample_inference_steps", "2000"],
        "--sample_inference_steps must be at most the 1000 training timesteps",
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


def tiny_run_flags(dataset: str) -> list[str]:
    """A demo-preset run on the tiny dataset that samples almost nothing at the end."""
    return ["--dataset", dataset, "--train_batch_size", "4", "--eval_every", "0", "--report_to", "none",
            "--num_sample_images", "4", "--sample_inference_steps", "2"]  # fmt: skip


def assert_stopped(stderr: str, signal_name: str, checkpoint: Path) -> None:
    """One line after the progress bar, naming the signal and the checkpoint to resume from; no traceback."""
    lines = [line for line in stderr.splitlines() if line.strip() and not line.startswith("steps:")]
    assert lines == [
        f"train_ddpm.py: interrupted: stopped by {signal_name}; '{checkpoint}' is the last checkpoint "
        "(--resume_from_checkpoint latest)"
    ], stderr


def test_ctrl_c_stops_with_one_line_and_keeps_the_last_checkpoint(
    script, capsys, tiny_dataset, tmp_path, monkeypatch
):
    real_loss = training_steps.diffusion_loss
    calls = {"count": 0}

    def ctrl_c_during_step_5(*args):
        calls["count"] += 1
        if calls["count"] == 5:
            signal.raise_signal(signal.SIGINT)
        return real_loss(*args)

    monkeypatch.setattr(training_steps, "diffusion_loss", ctrl_c_during_step_5)
    run_dir = tmp_path / "run"
    flags = [*tiny_run_flags(tiny_dataset), "--max_train_steps", "50", "--checkpointing_steps", "2"]
    code, stderr = run_script(script, capsys, run_dir, *flags)

    assert code == 130
    checkpoints = run_dir / "checkpoints"
    assert_stopped(stderr, "SIGINT", checkpoints / "checkpoint-4")
    assert sorted(path.name for path in checkpoints.iterdir()) == ["checkpoint-2", "checkpoint-4"]
    assert not (run_dir / "model_index.json").exists()
    lock_folder(run_dir).release()  # the stopped run let go of its folder


def test_a_checkpoint_that_cannot_be_written_is_one_line_and_keeps_the_one_before(
    script, capsys, tiny_dataset, tmp_path, monkeypatch
):
    real_save_state = Accelerator.save_state

    def disk_full_at_step_4(self, output_dir):
        if output_dir.endswith("checkpoint-4"):
            Path(output_dir, "model.safetensors").write_bytes(b"half")
            raise RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed")
        return real_save_state(self, output_dir)

    monkeypatch.setattr(Accelerator, "save_state", disk_full_at_step_4)
    run_dir = tmp_path / "run"
    flags = [*tiny_run_flags(tiny_dataset), "--max_train_steps", "6", "--checkpointing_steps", "2"]
    code, stderr = run_script(script, capsys, run_dir, *flags)

    assert code == 1
    lines = [line for line in stderr.splitlines() if line.strip() and not line.startswith("steps:")]
    assert lines == [
        f"train_ddpm.py: error: checkpoint '{run_dir / 'checkpoints' / 'checkpoint-4'}' could not be written: "
        "PytorchStreamWriter failed writing file data/0: file write failed"
    ]
    assert [path.name for path in (run_dir / "checkpoints").iterdir()] == ["checkpoint-2"]


LOCK_HOLDER = """
import importlib.util, sys, time
spec = importlib.util.spec_from_file_location("folder_lock", sys.argv[1])
folder_lock = importlib.util.module_from_spec(spec)
spec.loader.exec_module(folder_lock)
folder_lock.lock_folder(__import__("pathlib").Path(sys.argv[2]))
print("locked", flush=True)
time.sleep(600)
"""


def test_a_folder_another_process_holds_is_refused_until_that_process_dies(script, capsys, tmp_path):
    run_dir = tmp_path / "run"
    module = REPO_ROOT / "dia_diffusion" / "runtime" / "folder_lock.py"
    holder = subprocess.Popen(
        [sys.executable, "-c", LOCK_HOLDER, str(module), str(run_dir)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline() == "locked\n"
        code, stderr = run_script(script, capsys, run_dir)
        assert_one_line_error(
            code, stderr, f"--output_dir '{run_dir}' is in use by another training (process {holder.pid} on "
        )
        assert [path.name for path in run_dir.iterdir()] == [".lock"]
    finally:
        holder.kill()  # SIGKILL: the holder cleans nothing up
        holder.wait()
    lock_folder(run_dir).release()


def process_is_running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.slow
def test_killing_accelerate_launch_stops_its_training(script, capsys, tiny_dataset, tmp_path):
    """`accelerate launch` (one process) passes no SIGTERM on: the training must notice its launcher's death, stop at
    a clean point and let go of its folder. While it runs, a second training into its folder is refused."""
    run_dir = tmp_path / "run"
    flags = [*tiny_run_flags(tiny_dataset), "--output_dir", str(run_dir), "--max_train_steps", "100000",
             "--checkpointing_steps", "2", "--checkpoints_total_limit", "2"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    launcher = subprocess.Popen(
        [*ACCELERATE_LAUNCH, str(SCRIPT), *flags],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    trainers = []
    try:
        deadline = time.monotonic() + 240
        while find_latest_checkpoint(run_dir / "checkpoints") is None:
            assert launcher.poll() is None and time.monotonic() < deadline, "the training did not start"
            time.sleep(0.2)
        trainers = [
            int(pid) for pid in Path(f"/proc/{launcher.pid}/task/{launcher.pid}/children").read_text().split()
        ]
        assert len(trainers) == 1

        code, stderr = run_script(
            script, capsys, run_dir, *tiny_run_flags(tiny_dataset), "--resume_from_checkpoint", "latest"
        )
        assert_one_line_error(code, stderr, f"--output_dir '{run_dir}' is in use by another training")

        launcher.send_signal(signal.SIGTERM)
        # The training process holds the launcher's stderr until it exits.
        _, launcher_stderr = launcher.communicate(timeout=120)
        assert launcher.returncode == -signal.SIGTERM  # killed by it: the shell's 143
    finally:
        launcher.kill()
        for pid in trainers:
            if process_is_running(pid):
                os.kill(pid, signal.SIGKILL)
    assert not any(map(process_is_running, trainers))
    checkpoints = run_dir / "checkpoints"
    last = find_latest_checkpoint(checkpoints)
    assert_stopped(launcher_stderr, "SIGTERM", last)
    assert all(path.name.startswith("checkpoint-") for path in checkpoints.iterdir())

    # The folder is free again, and the run continues from where it stopped.
    step = checkpoint_step(last)
    code, _ = run_script(
        script,
        capsys,
        run_dir,
        *flags,
        "--resume_from_checkpoint",
        "latest",
        "--max_train_steps",
        str(step + 1),
    )
    assert code == 0
    assert find_latest_checkpoint(checkpoints) == checkpoints / f"checkpoint-{step + 1}"


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
    # accelerate launch --quiet shows the same line but turns every failure into exit status 1.
    launched = subprocess.run(
        [*ACCELERATE_LAUNCH, str(SCRIPT), "--dataset", str(tmp_path / "missing"), "--output_dir", str(tmp_path / "bad")],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert launched.returncode == 1
    assert launched.stderr.strip().splitlines() == bad.stderr.strip().splitlines()

    run_dir = tmp_path / "run"
    flags = ["--output_dir", str(run_dir), "--max_train_steps", "2", "--train_batch_size", "8", "--eval_every", "0",
             "--num_sample_images", "4", "--sample_inference_steps", "2", "--report_to", "none"]  # fmt: skip
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
