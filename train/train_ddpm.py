"""Train a DDPM with a DIA (or stock) UNet and leave a diffusers DDPMPipeline folder.

    python train/train_ddpm.py --preset demo --output_dir runs/demo

(several processes: `accelerate launch` or `torchrun`). A preset (see --list_presets) sets every value; each flag
given overrides one. The resolved config is written to OUTPUT_DIR/training_config.json. Re-running the same command
with --resume_from_checkpoint latest continues a run. Errors end in one line and exit status 2 (bad input) or 1; a
stop signal in one line and 128 + the signal. See docs/training.md.
"""

import argparse
import os
import sys
from pathlib import Path

# ruff: noqa: E402 -- the parent is read before the imports below, which take seconds: a launcher that dies during
# them is still noticed (see follow_launcher).
LAUNCHER_PID = os.getppid()

from dia_diffusion_entry import interrupted_quietly

# Ctrl-C during the imports (seconds) ends in one line too.
with interrupted_quietly("train_ddpm.py"):
    from dia_diffusion.commands.cli import EXIT_BAD_INPUT, OneLineArgumentParser
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
    from dia_diffusion.training.presets import PRESETS, UNET_VARIANTS
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
)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineArgumentParser(prog="train_ddpm.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="demo", help="named recipe to start from (default: demo)")
    parser.add_argument("--list_presets", action="store_true", help="print the presets and exit")
    parser.add_argument("--output_dir", help="run folder (default: runs/PRESET)")
    flag_bool = argparse.BooleanOptionalAction

    data = parser.add_argument_group("data")
    data.add_argument(
        "--dataset",
        help="digits, fashion_mnist, cifar10, an image folder, a save_to_disk folder, "
        "a cifar-10-python.tar.gz or a hub dataset name",
    )
    data.add_argument("--image_column", help="the dataset's image column when it is not 'image'")
    data.add_argument("--resolution", type=int)
    data.add_argument("--channels", type=int, help="1 (grey) or 3 (RGB); images are converted to match")
    data.add_argument("--random_flip", action=flag_bool, default=None)
    data.add_argument("--dataloader_num_workers", type=int)
    data.add_argument(
        "--class_conditional",
        action=flag_bool,
        default=None,
        help="condition on the dataset's class labels (saves a ClassConditionalPipeline)",
    )
    data.add_argument(
        "--class_dropout", type=float, help="probability of dropping a label to the null class (default 0.1)"
    )
    data.add_argument(
        "--guidance_scale",
        type=float,
        help="classifier-free guidance of the sample grid and evaluation (default 1)",
    )

    model = parser.add_argument_group("model")
    model.add_argument("--unet", help=f"one of {', '.join(UNET_VARIANTS)}")
    model.add_argument("--dia_sharing", help="global, per_width or per_block")
    model.add_argument("--dia_reduction", type=int)
    model.add_argument("--dia_hidden_channels", type=int)
    model.add_argument("--dia_gate", help="sigmoid or identity")
    model.add_argument("--dia_condition", help="none, or timestep: the attention also sees the noise level")
    model.add_argument(
        "--dia_global_cell", help="bottleneck or widest: the width of the globally shared cell"
    )
    model.add_argument(
        "--init_unet",
        help="start from a saved UNet: a pipeline folder, its unet/ folder or a hub name; its layout replaces "
        "the preset's (see docs/training.md)",
    )
    model.add_argument("--gradient_checkpointing", action=flag_bool, default=None)
    model.add_argument("--compile", action=flag_bool, default=None, help="torch.compile the UNet (inductor)")
    model.add_argument("--prediction_type", help="epsilon, sample or v_prediction")
    model.add_argument("--beta_schedule", help="linear, scaled_linear, squaredcos_cap_v2 (cosine) or sigmoid")

    optimisation = parser.add_argument_group("optimisation")
    optimisation.add_argument("--max_train_steps", type=int, help="optimizer steps")
    optimisation.add_argument("--train_batch_size", type=int, help="images per process per micro-batch")
    optimisation.add_argument("--gradient_accumulation_steps", type=int)
    optimisation.add_argument("--learning_rate", type=float)
    optimisation.add_argument(
        "--lr_scheduler", help="a diffusers schedule name, e.g. constant_with_warmup, cosine"
    )
    optimisation.add_argument("--lr_warmup_steps", type=int)
    optimisation.add_argument("--max_grad_norm", type=float)
    optimisation.add_argument("--ema_decay", type=float)
    optimisation.add_argument("--mixed_precision", help="no, fp16 or bf16")
    optimisation.add_argument("--seed", type=int)

    run = parser.add_argument_group("checkpoints, logs, samples, evaluation")
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
    # The flag --report_to replaced; old command lines still run.
    run.add_argument("--logger", dest="report_to", help=argparse.SUPPRESS)
    run.add_argument("--sample_every", type=int, help="steps between sample grids (0: only at the end)")
    run.add_argument("--num_sample_images", type=int)
    run.add_argument("--sample_inference_steps", type=int)
    run.add_argument("--eval_every", type=int, help="steps between evaluations, and at the end (0: never)")
    run.add_argument("--eval_feature", help="feature space of the Fréchet distance (default: classifier)")
    run.add_argument("--eval_num_samples", type=int)
    run.add_argument("--eval_inference_steps", type=int)

    hub = parser.add_argument_group("publishing (the final pipeline folder and its model card)")
    hub.add_argument(
        "--push_to_hub",
        action="store_true",
        default=None,
        help="upload it to the Hugging Face Hub at the end (credentials: hf auth login or HF_TOKEN)",
    )
    hub.add_argument("--hub_model_id", help="the hub repository (default: the output folder's name)")
    hub.add_argument("--hub_private", action="store_true", default=None, help="create the repository private")
    return parser


def report(error: BaseException, kind: str = "error") -> None:
    print_once(f"train_ddpm.py: {kind}: {error}")


def interruption_message(stop: RunInterrupted, output_dir: str) -> str:
    latest = find_latest_checkpoint(Path(output_dir) / CHECKPOINTS_DIRNAME)
    if latest is None:
        return f"stopped by {stop.signal_name}; no checkpoint in '{output_dir}' yet"
    return (
        f"stopped by {stop.signal_name}; '{latest}' is the last checkpoint (--resume_from_checkpoint latest)"
    )


def main(argv: list[str] | None = None, launcher_pid: int | None = None) -> int:
    """`launcher_pid`: the parent at start-up; when a launcher (accelerate, torchrun) started the script, its death
    stops the training."""
    args = build_parser().parse_args(argv)
    if args.list_presets:
        for name, preset in PRESETS.items():
            print(f"{name:14s} {preset.description}")
        return 0
    overrides = {key: value for key, value in vars(args).items() if key not in ("preset", "list_presets")}
    overrides["output_dir"] = args.output_dir or os.path.join("runs", args.preset)
    with stop_on_signals():
        try:
            if launcher_pid is not None:
                follow_launcher(launcher_pid)
            config = resolve_config(args.preset, overrides)
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


if __name__ == "__main__":
    with interrupted_quietly("train_ddpm.py"):
        sys.exit(main(launcher_pid=LAUNCHER_PID))
