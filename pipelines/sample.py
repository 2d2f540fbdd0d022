"""Sample a trained model (DIA or stock UNet) through diffusers' stock DDPMPipeline / DDIMPipeline.

    python pipelines/sample.py --model runs/demo --scheduler ddim --num_inference_steps 50 \\
        --num_images 1000 --seed 0 --batch_size 64 --output samples/demo

writes samples/demo/000000.png … 000999.png, grid.png (the first 64) and samples.json (how they were made). A
class-conditional model (train_ddpm.py --class_conditional) takes --class_labels 3 (or 3 5 7: image i shows the
(i mod 3)-th of them; default every class in turn), or class names (--class_labels Trouser "Ankle boot") from its
id2label, and --guidance_scale 2.0 (classifier-free guidance).
They are written aside and replace a previous samples folder only when complete: a failure or Ctrl-C leaves it as
it was. Image i is seeded seed + i, so it is the same whatever --batch_size or the number of processes;
`accelerate launch pipelines/sample.py ...` splits the images across processes.
"""

import argparse
import sys

from dia_diffusion_entry import interrupted_quietly

# Ctrl-C during the imports (seconds) ends in one line too.
with interrupted_quietly("sample.py"):
    from dia_diffusion.commands.cli import OneLineArgumentParser, run_reporting_errors
    from dia_diffusion.pipelines.class_conditional import ClassSampling
    from dia_diffusion.pipelines.sampling import SCHEDULERS, process_state, sample_to_folder


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = OneLineArgumentParser(
        prog="sample.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", required=True, help="a pipeline folder saved by train/train_ddpm.py, or its hub name"
    )
    parser.add_argument("--scheduler", choices=SCHEDULERS, default="ddim")
    parser.add_argument("--num_inference_steps", type=int, default=50)
    parser.add_argument(
        "--eta", type=float, default=None, help="DDIM eta in [0, 1] (default 0, deterministic)"
    )
    parser.add_argument("--num_images", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0, help="image i is seeded seed + i")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--output", required=True, help="folder for the PNGs, grid.png and samples.json")
    parser.add_argument("--half", action="store_true", help="float16 weights and sampling (CUDA only)")
    parser.add_argument(
        "--class_labels",
        type=class_label,
        nargs="+",
        help="class-conditional models: class ids or names (the model's id2label; a whole number is an id); image i "
        "shows class_labels[i mod their count] (default: every class in turn)",
    )
    parser.add_argument(
        "--guidance_scale",
        type=float,
        default=1.0,
        help="class-conditional models: classifier-free guidance scale (default 1, no guidance)",
    )
    return parser.parse_args(argv)


def class_label(text: str) -> int | str:
    """A whole number is a class id; anything else a class name, which the model's id2label turns into one."""
    try:
        return int(text)
    except ValueError:
        return text


def sample(args: argparse.Namespace) -> None:
    output = sample_to_folder(
        model=args.model,
        output=args.output,
        scheduler=args.scheduler,
        num_inference_steps=args.num_inference_steps,
        eta=args.eta,
        num_images=args.num_images,
        seed=args.seed,
        batch_size=args.batch_size,
        half=args.half,
        classes=ClassSampling(tuple(args.class_labels or ()) or None, args.guidance_scale),
    )
    if process_state().is_main_process:
        print(f"wrote {args.num_images} images and {output / 'grid.png'}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_reporting_errors("sample.py", lambda: sample(args))


if __name__ == "__main__":
    with interrupted_quietly("sample.py"):
        sys.exit(main())
