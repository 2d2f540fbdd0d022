"""A run resumed from a checkpoint taken inside a `--log_every` window logs the uninterrupted run's metrics rows:
the open window (loss sum, batch and step counts) travels with the checkpoint."""

import pytest
from test_train_loop import loss_with_nan_at_call, reset_accelerate_state
from tiny_training import assert_same_weights, read_metrics, tiny_config

from dia_diffusion.training import step as training_steps
from dia_diffusion.training.checkpointing import find_latest_checkpoint
from dia_diffusion.training.loop import train
from dia_diffusion.training.step import NonFiniteLossError

pytestmark = pytest.mark.usefixtures("isolated_run")


def test_a_resume_inside_a_log_window_logs_the_uninterrupted_rows(tiny_dataset, tmp_path, monkeypatch):
    # Rows at steps 2, 4 and 6; the checkpoint at step 3 sits in the middle of the window that closes at step 4.
    settings = {"max_train_steps": 6, "checkpointing_steps": 3, "log_every": 2}
    uninterrupted = train(tiny_config(tiny_dataset, tmp_path / "whole", **settings))
    reset_accelerate_state()

    # A NaN loss at step 5 stops the run before that step's update, past the step-3 checkpoint.
    with monkeypatch.context() as patch:
        patch.setattr(training_steps, "diffusion_loss", loss_with_nan_at_call(5))
        with pytest.raises(NonFiniteLossError):
            train(tiny_config(tiny_dataset, tmp_path / "split", **settings))
    assert find_latest_checkpoint(tmp_path / "split" / "checkpoints").name == "checkpoint-3"
    reset_accelerate_state()
    resumed = train(
        tiny_config(tiny_dataset, tmp_path / "split", resume_from_checkpoint="latest", **settings)
    )

    assert_same_weights(uninterrupted, resumed)

    def logged(run: str) -> list[tuple]:
        return [(row["step"], row["loss"], row["lr"]) for row in read_metrics(tmp_path / run)]

    assert [step for step, _, _ in logged("whole")] == [2, 4, 6]
    assert logged("split") == logged("whole")  # floats compared exactly
