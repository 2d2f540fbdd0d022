"""What the training scripts (train/train_ddpm.py, train/train_text_to_image.py) share: the flags of the one training
loop, and a run from a resolved config to an exit status, every error in one line.

Exit statuses: 0; 2 for bad input (a flag, a dataset, a checkpoint, a folder another run holds), reported before
anything is written; 1 when training fails or the push to the hub does (the trained pipeline is saved); 128 + the
signal when a stop signal ends the run (its last checkpoint is intact and named).
"""

import argparse
import os
from pathlib import Path
from typing import Any

from dia_diffusion.commands.cli import EXIT_BAD_INPUT
from dia_diffusion.data.image_datasets import DatasetSpecError
from dia_diffusion.hub.upload import HubPushError
from dia_diffusion.runtime.errors import print_once
from dia_diffusion.runtime.folder_lock import FolderInUseError
from dia_diffusion.runtime.interruption import RunInterrupted, follow_launcher, stop_on_signals
from dia_diffusion.training.checkpointing import (
    CHECKPOINTS_DIRNAME,
    CheckpointLoadError,
    CheckpointNotFoundError,
    OutputWriteError,
    RunIdentityError,
    find_latest_checkpoint,
)
from dia_diffusion.training.config import TrainingConfigError, resolve_config
from dia_diffusion.training.initial_weights import InitialUNetError
from dia_diffusion.training.loop import train
from dia_diffusion.training.presets import UNET_VARIANTS, Preset
from dia_diffusion.training.pretrained_pipeline import PretrainedPipelineError
from dia_diffusion.training.publishing import push_run
from dia_diffusion.training.step import NonFiniteLossError

EXIT_TRAINING_FAILED = 1
# The training finished and everything is saved; what was asked for did not all happen.
EXIT_PUSH_FAILED = 1
BAD_INPUT_ERRORS = (
    DatasetSpecError,
    TrainingConfigError,
    RunIdentityError,
    CheckpointNotFoundError,
    CheckpointLoadError,
    FolderInUseError,
    InitialUNetError,
    PretrainedPipelineError,
)
FLAG_BOOL = argparse.BooleanOptionalAction


def add_dia_arguments(model: argparse._ArgumentGroup) -> None:
    model.add_argument("--unet", help=f"one of {', '.join(UNET_VARIANTS)}")
    model.add_argument("--dia_sharing", help="global, per_width or per_block")
    model.add_argument("--dia_reduction", type=int)
    model.add_argument("--dia_hidden_channels", type=int)
    model.add_argument("--dia_gate", help="sigmoid or identity")
    model.add_argument("--dia_condition", help="none, or timestep: the attention also sees the noise level")
    model.add_argument(
        "--dia_global_cell", help="bottleneck or widest: the width of the globally shared cell"
    )
    model.add_argument("--gradient_checkpointing", action=FLAG_BOOL, default=None)
    model.add_argument("--compile", action=FLAG_BOOL, default=None, help="torch.compile the UNet (inductor)")


def add_optimisation_arguments(parser: argparse.ArgumentParser) -> None:
    optimisation = parser.add_argument_group("optimisation")
    optimisation.add_argument("--max_train_steps", type=int, help="optimizer steps")
    optimisation.add_argument("--train_batch_size", type=int, help="images per process per micro-batch")
    optimisation.add_argument("--gradient_accumulation_steps", type=int)
    optimisation.add_argument("--learning_rate", type=float)
    optimisation.add_argument(
        "--lr_scheduler", help="a diffusers schedule name, e.g. constant_with_warmup, cosine"
    )
    optimisation.add_argument("--lr_warmup_steps", type=int)
    optimisation.add_argument("--adam_weight_decay", type=float)
    optimisation.add_argument("--max_grad_norm", type=float)
    optimisation.add_argument("--ema_decay", type=float)
    optimisation.add_argument("--mixed_precision", help="no, fp16 or bf16")
    optimisation.add_argument("--seed", type=int)
    optimisation.add_argument(
        "--snr_gamma", type=float, help="Min-SNR-gamma loss weighting, e.g. 5 (default: none, DDPM's loss)"
    )
    optimisation.add_argument(
        "--noise_offset",
        type=float,
        help="noise offset, e.g. 0.05, for very dark or bright images (default 0)",
    )


def add_run_arguments(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    run = parser.add_argument_group("checkpoints, logs, samples")
    run.add_argument("--checkpointing_steps", type=int)
    run.add_argument(
        "--checkpoints_total_limit", type=int, help="keep the newest N checkpoints (0: keep all)"
    )
    run.add_argument("--resume_from_checkpoint", help="'latest' or a checkpoint folder")
    run.add_argument("--log_every", type=int, help="steps between metrics.jsonl rows")
    run.add_argument(
        "--report_to",
        help="experiment tracker: tensorboard, wandb, all or none (metrics.jsonl is always written)",
    )
    run.add_argument("--sample_every", type=int, help="steps between sample grids (0: only at the end)")
    run.add_argument("--num_sample_images", type=int)
    run.add_argument("--sample_inference_steps", type=int)

    hub = parser.add_argument_group("publishing (the final pipeline folder and its model card)")
    hub.add_argument(
        "--push_to_hub",
        action="store_true",
        default=None,
        help="upload it to the Hugging Face Hub at the end (credentials: hf auth login or HF_TOKEN)",
    )
    hub.add_argument("--hub_model_id", help="the hub repository (default: the output folder's name)")
    hub.add_argument("--hub_private", action="store_true", default=None, help="create the repository private")
    return run


def interruption_message(stop: RunInterrupted, output_dir: str) -> str:
    latest = find_latest_checkpoint(Path(output_dir) / CHECKPOINTS_DIRNAME)
    if latest is None:
        return f"stopped by {stop.signal_name}; no checkpoint in '{output_dir}' yet"
    return (
        f"stopped by {stop.signal_name}; '{latest}' is the last checkpoint (--resume_from_checkpoint latest)"
    )


def run_script(
    prog: str, args: argparse.Namespace, presets: dict[str, Preset], launcher_pid: int | None
) -> int:
    """What a training script does with its parsed flags: `--list_presets`, or the run they describe (its output
    folder runs/PRESET by default)."""
    if args.list_presets:
        for name, preset in presets.items():
            print(f"{name:14s} {preset.description}")
        return 0
    overrides = {key: value for key, value in vars(args).items() if key not in ("preset", "list_presets")}
    overrides["output_dir"] = args.output_dir or os.path.join("runs", args.preset)
    return run_training(prog, args.preset, overrides, launcher_pid)


def run_training(prog: str, preset: str, overrides: dict[str, Any], launcher_pid: int | None) -> int:
    """Resolves and trains the run; `launcher_pid`: the parent at start-up, when a launcher (accelerate, torchrun)
    started the script, whose death stops the training."""

    def report(error: BaseException | str, kind: str = "error") -> None:
        print_once(f"{prog}: {kind}: {error}")

    with stop_on_signals():
        try:
            if launcher_pid is not None:
                follow_launcher(launcher_pid)
            config = resolve_config(preset, overrides)
            result = train(config)
        except BAD_INPUT_ERRORS as error:
            report(error)
            return EXIT_BAD_INPUT
        except (NonFiniteLossError, OutputWriteError, OSError) as error:
            report(error)
            return EXIT_TRAINING_FAILED
        except RunInterrupted as stop:
            report(interruption_message(stop, overrides["output_dir"]), kind="interrupted")
            return stop.exit_status
    if os.environ.get("RANK", "0") != "0":
        return 0
    print(f"trained {result.global_step} steps; pipeline saved in {config.output_dir}")
    if config.push_to_hub:
        try:
            repo_id = push_run(config, result.unet, result.global_step)
        except HubPushError as error:
            report(f"{error}; the pipeline and its card are saved in '{config.output_dir}'")
            return EXIT_PUSH_FAILED
        print(f"pushed to https://huggingface.co/{repo_id}")
    return 0
