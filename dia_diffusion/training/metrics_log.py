"""What a run logs: the rows of `metrics.jsonl`, the loss and throughput window behind each row, and the trackers
of `--report_to` with the hyper-parameters they record (every row goes to them too, with the same names and step)."""

import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

from dia_diffusion.runtime.output_files import write_atomically, write_error
from dia_diffusion.training.config import TrainingConfig
from dia_diffusion.training.presets import UNET_VARIANTS

METRICS_FILENAME = "metrics.jsonl"
# accelerate's `log_with` for each --report_to.
TRACKERS = {"tensorboard": ["tensorboard"], "wandb": ["wandb"], "all": ["tensorboard", "wandb"], "none": []}


def tracker_hyperparameters(config: TrainingConfig) -> dict[str, Any]:
    """The run's settings as the trackers record them. TensorBoard's hparams accept only scalars and strings: the
    DIA options are all there (an unset one as "default", the attention kind of --unet as `dia_attention`), and the
    UNet layout as JSON text."""
    values = {
        key: value for key, value in asdict(config).items() if isinstance(value, (int, float, str, bool))
    }
    values.update(
        {name: "default" if value is None else value for name, value in config.dia_options().items()}
    )
    values["dia_attention"] = UNET_VARIANTS[config.unet] or "none"
    values["unet_config"] = json.dumps(config.unet_config)
    return values


def tracker_init_kwargs(config: TrainingConfig) -> dict[str, dict[str, Any]]:
    """W&B's run takes the output folder's name, and keeps its files in <output_dir>/logs/wandb unless WANDB_DIR
    names another place (offline runs are synced from there with `wandb sync`)."""
    if config.report_to not in ("wandb", "all"):
        return {}
    options: dict[str, Any] = {"name": Path(config.output_dir).resolve().name}
    if not os.environ.get("WANDB_DIR"):
        options["dir"] = str(Path(config.output_dir) / "logs")
        Path(options["dir"]).mkdir(parents=True, exist_ok=True)
    return {"wandb": options}


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
