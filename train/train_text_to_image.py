"""Fine-tune a Stable Diffusion UNet with DIA (or stock) on captioned images and leave a StableDiffusionPipeline folder.

    accelerate launch train/train_text_to_image.py --pretrained_model stable-diffusion-v1-5/stable-diffusion-v1-5 \
        --dataset my_images --output_dir runs/my-sd --mixed_precision bf16 --gradient_checkpointing

`--pretrained_model` is a pipeline folder or a hub name (SD 1.x/2.x). Its UNet is retrofitted with DIA with the
identity gate, so step 0 computes exactly what the checkpoint computes; `--unet stock` fine-tunes the stock UNet, the
comparison at the same seed. The VAE and text encoder stay frozen. `--dataset` is an image folder with a
metadata.jsonl (`{"file_name": ..., "text": ...}` per image), a save_to_disk folder or a hub dataset. The training
loop is train_ddpm.py's: the same checkpoints, resume, stop signals, one-line errors and exit statuses. See
docs/training.md.
"""

import argparse
import os
import sys

# ruff: noqa: E402 -- the parent is read before the imports below, which take seconds: a launcher that dies during
# them is still noticed (see follow_launcher).
LAUNCHER_PID = os.getppid()

from dia_diffusion_entry import interrupted_quietly

# Ctrl-C during the imports (seconds) ends in one line too.
with interrupted_quietly("train_text_to_image.py"):
    from dia_diffusion.commands.cli import OneLineArgumentParser
    from dia_diffusion.commands.training_run import (
        FLAG_BOOL,
        add_dia_arguments,
        add_optimisation_arguments,
        add_run_arguments,
        run_script,
    )
    from dia_diffusion.training.presets import TEXT_TO_IMAGE_PRESETS

DEFAULT_PRESET = "sd-finetune"


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineArgumentParser(prog="train_text_to_image.py", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--preset", default=DEFAULT_PRESET, help=f"recipe to start from (default: {DEFAULT_PRESET})"
    )
    parser.add_argument("--list_presets", action="store_true", help="print the presets and exit")
    parser.add_argument("--output_dir", help="run folder (default: runs/PRESET)")

    model = parser.add_argument_group("model")
    model.add_argument(
        "--pretrained_model", help="the Stable Diffusion pipeline to fine-tune: a folder or a hub name"
    )
    add_dia_arguments(model)

    data = parser.add_argument_group("data")
    data.add_argument(
        "--dataset", help="an image folder with metadata.jsonl, a save_to_disk folder or a hub dataset"
    )
    data.add_argument("--image_column", help="the dataset's image column when it is not 'image'")
    data.add_argument("--caption_column", help="the dataset's caption column (default: text)")
    data.add_argument(
        "--resolution", type=int, help="training images are resized and cropped to this (default 512)"
    )
    data.add_argument(
        "--center_crop",
        action=FLAG_BOOL,
        default=None,
        help="crop at the centre (default: at a random place)",
    )
    data.add_argument("--random_flip", action=FLAG_BOOL, default=None)
    data.add_argument(
        "--caption_dropout",
        type=float,
        help="probability of training a caption as '' (default 0.1), for guidance",
    )
    data.add_argument(
        "--cache_latents",
        action=FLAG_BOOL,
        default=None,
        help="encode every image and caption once (needs --center_crop and no --random_flip)",
    )
    data.add_argument("--dataloader_num_workers", type=int)

    add_optimisation_arguments(parser)
    run = add_run_arguments(parser)
    run.add_argument(
        "--validation_prompts",
        nargs="+",
        help="prompts of the sample grid (default: the first four captions)",
    )
    run.add_argument(
        "--guidance_scale", type=float, help="classifier-free guidance of the sample grid (default 7.5)"
    )
    return parser


def main(argv: list[str] | None = None, launcher_pid: int | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.pretrained_model is None and not args.list_presets:
        build_parser().error("--pretrained_model is required: a Stable Diffusion pipeline folder or hub name")
    return run_script("train_text_to_image.py", args, TEXT_TO_IMAGE_PRESETS, launcher_pid)


if __name__ == "__main__":
    with interrupted_quietly("train_text_to_image.py"):
        sys.exit(main(launcher_pid=LAUNCHER_PID))
