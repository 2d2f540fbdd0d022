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

# ruff: noqa: E402 -- the parent is read before the imports below, which take seconds: a launcher that dies during
# them is still noticed (see follow_launcher).
LAUNCHER_PID = os.getppid()

from dia_diffusion_entry import interrupted_quietly

# Ctrl-C during the imports (seconds) ends in one line too.
with interrupted_quietly("train_ddpm.py"):
    from dia_diffusion.commands.cli import OneLineArgumentParser
    from dia_diffusion.commands.training_run import (
        FLAG_BOOL,
        add_dia_arguments,
        add_optimisation_arguments,
        add_run_arguments,
        run_script,
    )
    from dia_diffusion.training.presets import PRESETS


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineArgumentParser(prog="train_ddpm.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="demo", help="named recipe to start from (default: demo)")
    parser.add_argument("--list_presets", action="store_true", help="print the presets and exit")
    parser.add_argument("--output_dir", help="run folder (default: runs/PRESET)")

    data = parser.add_argument_group("data")
    data.add_argument(
        "--dataset",
        help="digits, fashion_mnist, cifar10, an image folder, a save_to_disk folder, "
        "a cifar-10-python.tar.gz or a hub dataset name",
    )
    data.add_argument("--image_column", help="the dataset's image column when it is not 'image'")
    data.add_argument("--resolution", type=int)
    data.add_argument("--channels", type=int, help="1 (grey) or 3 (RGB); images are converted to match")
    data.add_argument("--random_flip", action=FLAG_BOOL, default=None)
    data.add_argument("--dataloader_num_workers", type=int)
    data.add_argument(
        "--class_conditional",
        action=FLAG_BOOL,
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
    add_dia_arguments(model)
    model.add_argument(
        "--init_unet",
        help="start from a saved UNet: a pipeline folder, its unet/ folder or a hub name; its layout replaces "
        "the preset's (see docs/training.md)",
    )
    model.add_argument("--prediction_type", help="epsilon, sample or v_prediction")
    model.add_argument("--beta_schedule", help="linear, scaled_linear, squaredcos_cap_v2 (cosine) or sigmoid")

    add_optimisation_arguments(parser)
    run = add_run_arguments(parser)
    # The flag --report_to replaced; old command lines still run.
    run.add_argument("--logger", dest="report_to", help=argparse.SUPPRESS)
    evaluation = parser.add_argument_group("evaluation")
    evaluation.add_argument(
        "--eval_every", type=int, help="steps between evaluations, and at the end (0: never)"
    )
    evaluation.add_argument(
        "--eval_feature", help="feature space of the Fréchet distance (default: classifier)"
    )
    evaluation.add_argument("--eval_num_samples", type=int)
    evaluation.add_argument("--eval_inference_steps", type=int)
    return parser


def main(argv: list[str] | None = None, launcher_pid: int | None = None) -> int:
    """`launcher_pid`: the parent at start-up; when a launcher (accelerate, torchrun) started the script, its death
    stops the training."""
    args = build_parser().parse_args(argv)
    return run_script("train_ddpm.py", args, PRESETS, launcher_pid)


if __name__ == "__main__":
    with interrupted_quietly("train_ddpm.py"):
        sys.exit(main(launcher_pid=LAUNCHER_PID))
