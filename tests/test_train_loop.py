"""The training loop on a tiny UNet: smoke, bitwise-exact resume, interrupted saves, the non-finite guard and the
recovery from it, corrupt checkpoints, stop signals, mixed precision on a CPU, two CPU processes in step, and what one
observed run shows (sampling and evaluation leave the weights alone, one EMA decay per optimizer step, clipped
gradients, flips, the prediction type). The step's parts are tested in test_train_step.py. Run as a script, this file
is the worker of the two-process test."""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from diffusers import DDPMPipeline
from safetensors.torch import load_file
from tiny_training import TINY_UNET, assert_same_weights, read_metrics, reset_accelerate_state, tiny_config

from dia_diffusion import DIAUNet2DModel
from dia_diffusion.evaluation.pipeline_evaluator import PipelineEvaluator
from dia_diffusion.runtime.interruption import RunInterrupted, stop_on_signals
from dia_diffusion.training import loop as training
from dia_diffusion.training import step as training_steps
from dia_diffusion.training.checkpointing import (
    CheckpointLoadError,
    RunIdentityError,
    checkpoint_step,
    find_latest_checkpoint,
)
from dia_diffusion.training.config import (
    TrainingConfigError,
)
from dia_diffusion.training.loop import train
from dia_diffusion.training.step import (
    NonFiniteLossError,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("isolated_run")


class SimulatedKill(BaseException):
    """Stands for the process dying in the middle of training: no handler catches it."""


def loss_with_nan_at_call(call: int):
    """training_steps.diffusion_loss, except that its `call`-th call returns NaN."""
    real_loss = training_steps.diffusion_loss
    calls = {"count": 0}

    def loss(*args):
        calls["count"] += 1
        value = real_loss(*args)
        return value * float("nan") if calls["count"] == call else value

    return loss


def test_smoke_run_leaves_a_loadable_ema_pipeline(tiny_dataset, tmp_path):
    config = tiny_config(tiny_dataset, tmp_path / "run", report_to="tensorboard")
    initial = {
        name: value.clone() for name, value in DIAUNet2DModel(**config.unet_arguments()).state_dict().items()
    }
    result = train(config)
    run_dir = tmp_path / "run"

    assert result.global_step == 4
    rows = read_metrics(run_dir)
    assert [row["step"] for row in rows] == [1, 2, 3, 4]
    assert all(torch.isfinite(torch.tensor(row["loss"])) and row["images_per_s"] > 0 for row in rows)
    assert json.loads((run_dir / "training_config.json").read_text())["seed"] == config.seed
    assert (run_dir / "samples" / "step-0000004.png").stat().st_size > 0
    assert list((run_dir / "logs").rglob("events.out.tfevents*"))
    assert [path.name for path in sorted((run_dir / "checkpoints").iterdir())] == [
        "checkpoint-2",
        "checkpoint-4",
    ]

    pipeline = DDPMPipeline.from_pretrained(run_dir)
    assert isinstance(pipeline.unet, DIAUNet2DModel)
    saved = dict(pipeline.unet.named_parameters())
    trained = dict(result.unet.named_parameters())
    # The pipeline holds the EMA weights, not the last training weights.
    for name, shadow in zip(trained, result.ema.shadow_params, strict=True):
        assert torch.equal(saved[name].detach(), shadow)
    assert any(not torch.equal(trained[name], initial[name]) for name in trained)
    images = pipeline(batch_size=2, num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images
    assert images[0].size == (config.resolution, config.resolution)


def test_eval_every_logs_fd_classifier_of_the_ema_weights(
    tiny_dataset, classifier_cache, tmp_path, monkeypatch
):
    monkeypatch.setenv("XDG_CACHE_HOME", classifier_cache)
    evaluated_weights = []
    real_call = PipelineEvaluator.__call__

    def recording_call(self, pipeline):
        evaluated_weights.append([parameter.detach().clone() for parameter in pipeline.unet.parameters()])
        return real_call(self, pipeline)

    monkeypatch.setattr(PipelineEvaluator, "__call__", recording_call)
    config = tiny_config(
        tiny_dataset, tmp_path / "run", eval_every=2, eval_num_samples=8, eval_inference_steps=2
    )
    result = train(config)

    rows = read_metrics(tmp_path / "run")
    assert [("fd_classifier" in row) for row in rows] == [False, True, False, True]
    assert all(row["fd_classifier"] >= 0 for row in rows if "fd_classifier" in row)
    assert not any("fid" in key for row in rows for key in row)
    # The last evaluation (step 4) saw the final EMA weights, not the training weights.
    assert len(evaluated_weights) == 2
    assert all(map(torch.equal, evaluated_weights[-1], result.ema.shadow_params))
    assert not all(map(torch.equal, evaluated_weights[-1], result.unet.parameters()))


def test_resume_after_interruption_is_bitwise_exact(tiny_dataset, tmp_path, monkeypatch):
    # 24 images / batch 4 = 6 batches per epoch = 3 optimizer steps of 2 micro-batches: the checkpoint at step 4
    # sits two batches into the second epoch. Flips and dropout exercise the restored RNG streams.
    settings = {
        "max_train_steps": 8,
        "checkpointing_steps": 4,
        "gradient_accumulation_steps": 2,
        "random_flip": True,
    }
    uninterrupted = train(tiny_config(tiny_dataset, tmp_path / "whole", **settings))
    reset_accelerate_state()

    real_loss = training_steps.diffusion_loss
    calls = {"count": 0}

    def dies_during_step_6(*args):
        calls["count"] += 1
        if calls["count"] == 11:  # step 6's first micro-batch: past the step-4 checkpoint
            raise SimulatedKill
        return real_loss(*args)

    monkeypatch.setattr(training_steps, "diffusion_loss", dies_during_step_6)
    with pytest.raises(SimulatedKill):
        train(tiny_config(tiny_dataset, tmp_path / "split", **settings))
    monkeypatch.setattr(training_steps, "diffusion_loss", real_loss)
    reset_accelerate_state()

    skipped = []
    real_skip = Accelerator.skip_first_batches

    def recording_skip(self, dataloader, num_batches=0):
        skipped.append(num_batches)
        return real_skip(self, dataloader, num_batches)

    monkeypatch.setattr(Accelerator, "skip_first_batches", recording_skip)
    resumed = train(
        tiny_config(tiny_dataset, tmp_path / "split", resume_from_checkpoint="latest", **settings)
    )

    assert skipped == [2]
    assert resumed.global_step == uninterrupted.global_step == 8
    assert_same_weights(uninterrupted, resumed)

    def comparable(rows):
        return [{key: value for key, value in row.items() if key != "images_per_s"} for row in rows]

    assert comparable(read_metrics(tmp_path / "split")) == comparable(read_metrics(tmp_path / "whole"))


def test_save_killed_midway_then_resume(tiny_dataset, tmp_path, monkeypatch):
    real_save_state = Accelerator.save_state

    def dies_in_second_save(self, output_dir):
        if Path(output_dir).name.endswith("checkpoint-4"):
            Path(output_dir, "model.safetensors").write_bytes(b"half")
            raise SimulatedKill
        return real_save_state(self, output_dir)

    monkeypatch.setattr(Accelerator, "save_state", dies_in_second_save)
    with pytest.raises(SimulatedKill):
        train(tiny_config(tiny_dataset, tmp_path / "run"))
    checkpoints = tmp_path / "run" / "checkpoints"
    assert find_latest_checkpoint(checkpoints) == checkpoints / "checkpoint-2"

    monkeypatch.setattr(Accelerator, "save_state", real_save_state)
    reset_accelerate_state()
    result = train(tiny_config(tiny_dataset, tmp_path / "run", resume_from_checkpoint="latest"))
    assert result.global_step == 4
    assert sorted(path.name for path in checkpoints.iterdir()) == ["checkpoint-2", "checkpoint-4"]


def test_non_finite_loss_stops_with_the_step_and_keeps_the_checkpoint(tiny_dataset, tmp_path, monkeypatch):
    monkeypatch.setattr(training_steps, "diffusion_loss", loss_with_nan_at_call(3))
    run_dir = tmp_path / "run"
    with pytest.raises(NonFiniteLossError, match=r"nan at step 3; .*checkpoint-2\)") as raised:
        train(tiny_config(tiny_dataset, run_dir))
    assert "\n" not in str(raised.value)
    checkpoint = find_latest_checkpoint(run_dir / "checkpoints")
    assert checkpoint == run_dir / "checkpoints" / "checkpoint-2" and checkpoint_step(checkpoint) == 2
    weights = load_file(checkpoint / "model.safetensors")
    assert all(torch.isfinite(value).all() for value in weights.values())
    assert not (run_dir / "model_index.json").exists()
    assert [row["step"] for row in read_metrics(run_dir)] == [1, 2]


def test_nan_recovery_resumes_in_the_same_folder_at_the_lower_learning_rate(
    tiny_dataset, tmp_path, monkeypatch
):
    """The documented way out of a NaN: the same command with --resume_from_checkpoint latest --learning_rate
    <lower>. The optimizer must run at the new rate, from the schedule's position, and the record must say so."""
    real_loss = training_steps.diffusion_loss
    monkeypatch.setattr(training_steps, "diffusion_loss", loss_with_nan_at_call(3))
    run_dir = tmp_path / "run"
    warmup = {"lr_warmup_steps": 4}  # the rate at steps 1-4 is 0, 1/4, 2/4, 3/4 of the base rate
    with pytest.raises(NonFiniteLossError, match="checkpoint-2"):
        train(tiny_config(tiny_dataset, run_dir, **warmup))
    monkeypatch.setattr(training_steps, "diffusion_loss", real_loss)
    reset_accelerate_state()

    used = []  # the optimizer's rate at each optimizer step
    real_step = training.training_step

    def recording_step(accelerator, unet, optimizer, *args):
        used.append(optimizer.param_groups[0]["lr"])
        return real_step(accelerator, unet, optimizer, *args)

    monkeypatch.setattr(training, "training_step", recording_step)
    train(tiny_config(tiny_dataset, run_dir, resume_from_checkpoint="latest", learning_rate=1e-4, **warmup))

    assert used == pytest.approx([2 / 4 * 1e-4, 3 / 4 * 1e-4])
    assert [row["lr"] for row in read_metrics(run_dir)] == pytest.approx(
        [0, 1 / 4 * 1e-3, 2 / 4 * 1e-4, 3 / 4 * 1e-4]
    )
    changes = [{"step": 0, "learning_rate": 1e-3}, {"step": 2, "learning_rate": 1e-4}]
    record = json.loads((run_dir / "training_config.json").read_text())
    assert record["learning_rate"] == 1e-4 and record["learning_rate_changes"] == changes
    checkpoint_record = run_dir / "checkpoints" / "checkpoint-4" / "training_config.json"
    assert json.loads(checkpoint_record.read_text())["learning_rate_changes"] == changes

    # Resuming from before the change at the first rate: the record follows the weights, not the last command.
    reset_accelerate_state()
    used.clear()
    checkpoint_2 = str(run_dir / "checkpoints" / "checkpoint-2")
    train(tiny_config(tiny_dataset, run_dir, resume_from_checkpoint=checkpoint_2, **warmup))
    assert used == pytest.approx([2 / 4 * 1e-3, 3 / 4 * 1e-3])
    record = json.loads((run_dir / "training_config.json").read_text())
    assert record["learning_rate_changes"] == [{"step": 0, "learning_rate": 1e-3}]


def test_a_corrupt_latest_checkpoint_is_named_and_the_one_before_is_used(tiny_dataset, tmp_path, capsys):
    run_dir = tmp_path / "run"
    whole = train(tiny_config(tiny_dataset, run_dir))
    reset_accelerate_state()
    checkpoints = run_dir / "checkpoints"
    weights = checkpoints / "checkpoint-4" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    capsys.readouterr()

    resumed = train(tiny_config(tiny_dataset, run_dir, resume_from_checkpoint="latest"))
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1
    assert warnings[0].startswith(f"warning: checkpoint '{checkpoints / 'checkpoint-4'}' cannot be loaded: ")
    assert warnings[0].endswith(f"; falling back to '{checkpoints / 'checkpoint-2'}'")
    # Steps 3 and 4 ran again from checkpoint-2, exactly, and replaced the corrupt checkpoint.
    for expected, actual in zip(whole.unet.parameters(), resumed.unet.parameters(), strict=True):
        assert torch.equal(expected, actual)
    assert load_file(weights).keys() == load_file(checkpoints / "checkpoint-2" / "model.safetensors").keys()


def test_checkpoints_that_cannot_be_resumed_are_refused_in_one_line(tiny_dataset, tmp_path):
    run_dir = tmp_path / "run"
    train(tiny_config(tiny_dataset, run_dir, max_train_steps=2, checkpointing_steps=1))
    checkpoints = run_dir / "checkpoints"

    def refusal(error_type, output_dir: Path, **overrides) -> str:
        reset_accelerate_state()
        with pytest.raises(error_type) as raised:
            train(tiny_config(tiny_dataset, output_dir, **overrides))
        assert "\n" not in str(raised.value)
        return str(raised.value)

    # Another architecture: refused by the run record the checkpoint carries, or, without one, by the load.
    narrower = {"unet_config": {**TINY_UNET, "block_out_channels": (4, 8)}}
    other = tmp_path / "other"
    refused = refusal(
        RunIdentityError, other, resume_from_checkpoint=str(checkpoints / "checkpoint-1"), **narrower
    )
    assert "belongs to a different run (unet_config: " in refused
    copied = shutil.copytree(checkpoints / "checkpoint-1", tmp_path / "copied" / "checkpoint-1")
    (copied / "training_config.json").unlink()
    refused = refusal(CheckpointLoadError, other, resume_from_checkpoint=str(copied), **narrower)
    assert refused.startswith(f"checkpoint '{copied}' cannot be loaded: ") and "size mismatch" in refused
    assert not (other / "training_config.json").exists()

    # A checkpoint past the run's length is refused: its weights would be published as a shorter run's. One at
    # the run's length resumes a finished run, which trains no further.
    refused = refusal(TrainingConfigError, run_dir, resume_from_checkpoint="latest", max_train_steps=1)
    assert refused.startswith(
        "--resume_from_checkpoint: checkpoint-2 is at step 2, past --max_train_steps 1; "
    )
    reset_accelerate_state()
    finished = train(tiny_config(tiny_dataset, run_dir, resume_from_checkpoint="latest", max_train_steps=2))
    assert finished.global_step == 2

    # Corrupt checkpoints: a named one is refused; `latest` tries each, newest first, then refuses.
    metrics_before = (run_dir / "metrics.jsonl").read_text()
    for step in (1, 2):
        (checkpoints / f"checkpoint-{step}" / "random_states_0.pkl").write_bytes(b"")
    refused = refusal(CheckpointLoadError, run_dir, resume_from_checkpoint=str(checkpoints / "checkpoint-2"))
    assert refused.startswith(f"checkpoint '{checkpoints / 'checkpoint-2'}' cannot be loaded: ")
    refused = refusal(CheckpointLoadError, run_dir, resume_from_checkpoint="latest")
    assert refused.startswith(f"checkpoint '{checkpoints / 'checkpoint-1'}' cannot be loaded: ")
    assert refused.endswith(f"no checkpoint in '{checkpoints}' can be loaded")
    assert (run_dir / "metrics.jsonl").read_text() == metrics_before


def test_resume_latest_without_a_checkpoint_says_it_starts_at_step_0(tiny_dataset, tmp_path, capsys):
    run_dir = tmp_path / "run"
    result = train(tiny_config(tiny_dataset, run_dir, resume_from_checkpoint="latest", max_train_steps=1))
    assert result.global_step == 1
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert warnings == [
        f"warning: --resume_from_checkpoint latest: '{run_dir / 'checkpoints'}' holds no checkpoint yet; "
        "starting at step 0"
    ]


def test_a_stop_signal_during_a_save_lets_the_checkpoint_finish(tiny_dataset, tmp_path, monkeypatch):
    real_save_state = Accelerator.save_state

    def terminated_while_saving_step_4(self, output_dir):
        if output_dir.endswith("checkpoint-4"):
            signal.raise_signal(signal.SIGTERM)
        return real_save_state(self, output_dir)

    monkeypatch.setattr(Accelerator, "save_state", terminated_while_saving_step_4)
    run_dir = tmp_path / "run"
    with stop_on_signals(), pytest.raises(RunInterrupted) as stopped:
        train(tiny_config(tiny_dataset, run_dir, max_train_steps=8))

    assert stopped.value.exit_status == 128 + signal.SIGTERM
    checkpoints = run_dir / "checkpoints"
    # Nothing half-written, nothing after the stop; the metrics reach the checkpoint's step.
    assert sorted(path.name for path in checkpoints.iterdir()) == ["checkpoint-2", "checkpoint-4"]
    assert checkpoint_step(checkpoints / "checkpoint-4") == 4
    assert load_file(checkpoints / "checkpoint-4" / "model.safetensors")
    assert [row["step"] for row in read_metrics(run_dir)] == [1, 2, 3, 4]


def test_mixed_precision_on_a_cpu_is_what_runs_and_what_is_recorded(tiny_dataset, tmp_path, monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    # fp16: on a CPU accelerate would train in fp32 without a word; refused before anything is written.
    with pytest.raises(TrainingConfigError, match="--mixed_precision fp16 does not run on cpu"):
        train(tiny_config(tiny_dataset, tmp_path / "fp16", mixed_precision="fp16"))
    assert not (tmp_path / "fp16").exists()

    # bf16 runs under torch.autocast: from the same weights, batch and noise its first loss differs from fp32's.
    first_loss = {}
    for precision in ("no", "bf16"):
        reset_accelerate_state()
        train(tiny_config(tiny_dataset, tmp_path / precision, mixed_precision=precision, max_train_steps=1))
        first_loss[precision] = read_metrics(tmp_path / precision)[0]["loss"]
        record = json.loads((tmp_path / precision / "training_config.json").read_text())
        assert record["mixed_precision"] == precision
    assert first_loss["bf16"] != first_loss["no"]
    assert first_loss["bf16"] == pytest.approx(first_loss["no"], rel=0.05)


def run_as_rank(dataset: str, run_dir: Path, states_dir: Path) -> None:
    """The two-process worker: trains, then leaves this rank's weights where the test can compare them."""
    config = tiny_config(dataset, run_dir, max_train_steps=6, lr_warmup_steps=4, checkpointing_steps=3)
    result = train(config)
    state = Accelerator()
    torch.save(
        {"unet": result.unet.state_dict(), "ema": result.ema.shadow_params},
        states_dir / f"rank-{state.process_index}-of-{state.num_processes}.pt",
    )


@pytest.mark.slow
def test_two_cpu_processes_train_in_step(tiny_dataset, tmp_path):
    states_dir = tmp_path / "states"
    states_dir.mkdir()
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        __file__, tiny_dataset, str(tmp_path / "run"), str(states_dir),
    ]  # fmt: skip
    # ACCELERATE_USE_CPU makes the two ranks CPU processes (gloo) on a machine with or without GPUs.
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "PYTHONPATH": str(REPO_ROOT)}
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]

    rank0 = torch.load(states_dir / "rank-0-of-2.pt")
    rank1 = torch.load(states_dir / "rank-1-of-2.pt")
    for name, value in rank0["unet"].items():
        assert torch.equal(value, rank1["unet"][name]), name
    for shadow0, shadow1 in zip(rank0["ema"], rank1["ema"], strict=True):
        assert torch.equal(shadow0, shadow1)

    run_dir = tmp_path / "run"
    rows = read_metrics(run_dir)
    # One row per step (only the main process writes), and the warmup advances once per optimizer step.
    assert [row["step"] for row in rows] == [1, 2, 3, 4, 5, 6]
    assert [row["lr"] for row in rows] == pytest.approx(
        [1e-3 * factor for factor in (0, 0.25, 0.5, 0.75, 1, 1)]
    )
    checkpoint = run_dir / "checkpoints" / "checkpoint-6"
    assert (checkpoint / "random_states_0.pkl").exists() and (checkpoint / "random_states_1.pkl").exists()
    assert json.loads((run_dir / "training_config.json").read_text())["num_processes"] == 2


if __name__ == "__main__":
    run_as_rank(sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]))
