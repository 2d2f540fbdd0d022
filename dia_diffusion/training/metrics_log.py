"""What a run logs: the rows of `metrics.jsonl`, the loss and throughput window behind each row, and the
hyper-parameters the tracker records."""

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from dia_diffusion.runtime.output_files import write_atomically, write_error
from dia_diffusion.training.config import TrainingConfig

METRICS_FILENAME = "metrics.jsonl"


def tracker_hyperparameters(config: TrainingConfig) -> dict[str, Any]:
    """TensorBoard's hparams accept only scalars and strings."""
    return {key: value for key, value in asdict(config).items() if isinstance(value, (int, float, str, bool))}


class LogWindow:
    """Mean loss and training throughput since the last metrics row (sampling, evaluation and checkpoint time
    excluded).

    A checkpoint saved inside a window carries its `state()`, and the resumed run `restore`s it, so the row that
    closes the window averages the same batches, in the same order, as the uninterrupted run's.
    """

    def __init__(self, images_per_step: int) -> None:
        self.images_per_step = images_per_step
        self.reset()

    def reset(self) -> None:
        self.loss_sum, self.batches, self.steps, self.seconds = 0.0, 0, 0, 0.0

    def state(self) -> dict[str, float]:
        """The open window, JSON-ready (floats survive JSON exactly); empty right after a row."""
        if not self.batches:
            return {}
        return {
            "loss_sum": self.loss_sum,
            "batches": self.batches,
            "steps": self.steps,
            "seconds": self.seconds,
        }

    def restore(self, state: dict[str, float] | None) -> None:
        self.reset()
        if state:
            self.loss_sum, self.batches = state["loss_sum"], state["batches"]
            self.steps, self.seconds = state["steps"], state["seconds"]

    def add_batch(self, loss: float) -> None:
        self.loss_sum += loss
        self.batches += 1

    def add_step(self, seconds: float) -> None:
        self.steps += 1
        self.seconds += seconds

    def close(self, learning_rate: float) -> dict[str, float]:
        row = {
            "loss": self.loss_sum / self.batches,
            "lr": learning_rate,
            "images_per_s": self.steps * self.images_per_step / self.seconds,
        }
        self.reset()
        return row


class MetricsLog:
    """`metrics.jsonl`: one JSON object per logged step.

    On resume, rows after the checkpoint's step are dropped: the interrupted run logged them, and the resumed run
    logs those steps again.
    """

    def __init__(self, path: Path, keep_until_step: int) -> None:
        kept = []
        if keep_until_step and path.is_file():
            for line in path.read_text().splitlines():
                try:
                    if json.loads(line)["step"] <= keep_until_step:
                        kept.append(line + "\n")
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue  # a line cut short by the interruption
        write_atomically(path, lambda partial: partial.write_text("".join(kept)))
        self.path = path
        self.file = path.open("a")

    def write(self, step: int, values: dict[str, float]) -> None:
        try:
            self.file.write(json.dumps({"step": step, **values}) + "\n")
            self.file.flush()
        except OSError as error:
            raise write_error(self.path, error) from None

    def close(self) -> None:
        self.file.close()
