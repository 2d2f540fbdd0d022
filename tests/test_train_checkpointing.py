"""Checkpoint publishing, `latest` discovery, rotation, resume resolution and the output-dir run check."""

import json
from pathlib import Path

import pytest

from dia_diffusion.training.checkpointing import (
    CheckpointNotFoundError,
    RunIdentityError,
    check_output_dir,
    checkpoint_step,
    find_latest_checkpoint,
    list_checkpoints,
    publish_pipeline,
    resolve_resume_checkpoint,
    save_checkpoint,
    write_run_record,
)


class SimulatedKill(BaseException):
    """Stands for the process dying: nothing after the raise runs, no cleanup handler catches it."""


class FakeAccelerator:
    """The part of accelerate.Accelerator that save_checkpoint uses; save_state writes a few files, or dies
    half-way through when `die_after_first_file` is set."""

    is_main_process = True

    def __init__(self, die_after_first_file: bool = False) -> None:
        self.die_after_first_file = die_after_first_file

    def wait_for_everyone(self) -> None:
        pass

    def save_state(self, output_dir: str) -> None:
        Path(output_dir, "model.safetensors").write_bytes(b"weights")
        if self.die_after_first_file:
            raise SimulatedKill
        Path(output_dir, "optimizer.bin").write_bytes(b"optimizer")


def test_a_save_killed_midway_is_never_picked_as_latest(tmp_path):
    checkpoints = tmp_path / "checkpoints"
    save_checkpoint(FakeAccelerator(), checkpoints, step=2, keep=None)
    with pytest.raises(SimulatedKill):
        save_checkpoint(FakeAccelerator(die_after_first_file=True), checkpoints, step=4, keep=None)

    assert (checkpoints / ".staging-checkpoint-4" / "model.safetensors").exists()
    assert find_latest_checkpoint(checkpoints) == checkpoints / "checkpoint-2"
    assert resolve_resume_checkpoint(checkpoints, "latest") == checkpoints / "checkpoint-2"

    # The next save of that step clears the leftover and publishes a complete checkpoint.
    save_checkpoint(FakeAccelerator(), checkpoints, step=4, keep=None)
    assert not (checkpoints / ".staging-checkpoint-4").exists()
    assert sorted(path.name for path in (checkpoints / "checkpoint-4").iterdir()) == [
        "model.safetensors",
        "optimizer.bin",
        "training_step.json",
    ]
    assert checkpoint_step(find_latest_checkpoint(checkpoints)) == 4


def test_latest_is_the_highest_step_not_the_newest_name(tmp_path):
    for step in (9, 10, 100):
        save_checkpoint(FakeAccelerator(), tmp_path, step=step, keep=None)
    (tmp_path / "checkpoint-final").mkdir()
    (tmp_path / "checkpoint-200").write_text("a file, not a checkpoint")
    assert [step for step, _ in list_checkpoints(tmp_path)] == [9, 10, 100]
    assert find_latest_checkpoint(tmp_path) == tmp_path / "checkpoint-100"
    assert find_latest_checkpoint(tmp_path / "missing") is None


def test_rotation_keeps_the_newest(tmp_path):
    for step in (1, 2, 3, 4):
        save_checkpoint(FakeAccelerator(), tmp_path, step=step, keep=2)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["checkpoint-3", "checkpoint-4"]


def test_saving_a_step_again_replaces_it_whole(tmp_path):
    save_checkpoint(FakeAccelerator(), tmp_path, step=5, keep=None)
    (tmp_path / "checkpoint-5" / "stale.bin").write_bytes(b"from the first save")
    save_checkpoint(FakeAccelerator(), tmp_path, step=5, keep=None)
    assert not (tmp_path / "checkpoint-5" / "stale.bin").exists()
    assert [path.name for path in tmp_path.iterdir()] == ["checkpoint-5"]


def test_resume_from_an_explicit_path(tmp_path):
    save_checkpoint(FakeAccelerator(), tmp_path, step=3, keep=None)
    assert resolve_resume_checkpoint(tmp_path, str(tmp_path / "checkpoint-3")) == tmp_path / "checkpoint-3"
    assert resolve_resume_checkpoint(tmp_path / "empty", "latest") is None
    with pytest.raises(CheckpointNotFoundError, match="does not exist"):
        resolve_resume_checkpoint(tmp_path, str(tmp_path / "checkpoint-7"))
    (tmp_path / "half").mkdir()
    with pytest.raises(CheckpointNotFoundError, match="not a complete checkpoint"):
        resolve_resume_checkpoint(tmp_path, str(tmp_path / "half"))


RECORD = {
    "seed": 0,
    "learning_rate": 1e-3,
    "block_out_channels": (32, 64),
    "log_every": 10,
    "num_processes": 1,
}
NEUTRAL = ("log_every",)


def test_output_dir_accepts_new_empty_and_same_run(tmp_path):
    check_output_dir(tmp_path / "new", RECORD, NEUTRAL, resuming=False)
    check_output_dir(tmp_path, RECORD, NEUTRAL, resuming=False)
    write_run_record(tmp_path, RECORD)
    # Tuples come back from JSON as lists; a neutral setting may change.
    check_output_dir(tmp_path, {**RECORD, "log_every": 1}, NEUTRAL, resuming=False)


def test_output_dir_of_a_different_run_is_refused(tmp_path):
    write_run_record(tmp_path, RECORD)
    with pytest.raises(RunIdentityError, match=r"holds a different run \(seed: 0 there, 1 now\)"):
        check_output_dir(tmp_path, {**RECORD, "seed": 1}, NEUTRAL, resuming=True)
    with pytest.raises(RunIdentityError, match="num_processes"):
        check_output_dir(tmp_path, {**RECORD, "num_processes": 2}, NEUTRAL, resuming=True)


def test_output_dir_with_results_needs_resume(tmp_path):
    write_run_record(tmp_path, RECORD)
    save_checkpoint(FakeAccelerator(), tmp_path / "checkpoints", step=1, keep=None)
    with pytest.raises(RunIdentityError, match="--resume_from_checkpoint latest"):
        check_output_dir(tmp_path, RECORD, NEUTRAL, resuming=False)
    check_output_dir(tmp_path, RECORD, NEUTRAL, resuming=True)


def test_output_dir_with_foreign_files_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(RunIdentityError, match="holds no training_config.json"):
        check_output_dir(tmp_path, RECORD, NEUTRAL, resuming=False)
    with pytest.raises(RunIdentityError, match="is a file"):
        check_output_dir(tmp_path / "notes.txt", RECORD, NEUTRAL, resuming=False)


def test_pipeline_index_lands_last(tmp_path):
    def save_pretrained(folder: str) -> None:
        Path(folder, "model_index.json").write_text(json.dumps({"_class_name": "DDPMPipeline"}))
        Path(folder, "unet").mkdir()
        Path(folder, "unet", "config.json").write_text("{}")

    def dies_while_saving(folder: str) -> None:
        Path(folder, "model_index.json").write_text("{}")
        raise SimulatedKill

    with pytest.raises(SimulatedKill):
        publish_pipeline(dies_while_saving, tmp_path)
    assert not (tmp_path / "model_index.json").exists()

    publish_pipeline(save_pretrained, tmp_path)
    assert json.loads((tmp_path / "model_index.json").read_text()) == {"_class_name": "DDPMPipeline"}
    assert (tmp_path / "unet" / "config.json").exists()
    assert not (tmp_path / ".staging-pipeline").exists()
