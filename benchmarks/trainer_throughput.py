"""Training throughput of `train/train_ddpm.py` against diffusers' own example trainer, `train_unconditional.py`.

    python benchmarks/trainer_throughput.py --example PATH/train_unconditional.py --quick   # ~5 min on 2 CPU cores
    python benchmarks/trainer_throughput.py --example PATH/train_unconditional.py           # DDPM CIFAR-10 layout, ~9 min
    python benchmarks/trainer_throughput.py --example PATH/train_unconditional.py --batch_size 128 --mixed_precision bf16 \
        --ours_args=--compile --warmup 1                                                    # on a GPU

Both trainers train the same stock UNet2DModel config on the same image folder under `accelerate launch`, with the
same batch, precision, EMA, data loader workers and logger; sampling, evaluation and checkpoints are cut to the least
each trainer allows (one image, one denoising step, no checkpoint before the end). Each trainer runs at two lengths:
(long - short) / (extra steps) is its time per step, and what the short run spent beyond its steps is its fixed
start-up-and-finish time (launcher, imports, dataset preparation, model set-up, final sampling and saving). The four
runs of a repeat are interleaved, the trainer that goes first alternates between repeats, and the report gives
medians over repeats. Process CPU seconds (the launcher and the trainer, user + system) are reported beside wall
time: on a machine shared with other jobs they vary much less. The image folder's arrow cache is built before the
first timed run, so every run finds it.

The example trains by epochs and keeps the last partial batch; the folder holds a whole number of batches, so both
trainers take the same steps. It also samples and saves its pipeline after its first epoch, so both lengths are at
least two epochs: then every run of it does that twice, and the difference cancels it.
The last line printed is one JSON object (`per_step_ratio` = the example's time per step / ours).
text_to_image_throughput.py times the text-to-image pair with this module's functions.
"""

import argparse
import json
import os
import platform
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import datasets
import numpy as np
import PIL.Image
import torch
from diffusers import UNet2DModel

from dia_diffusion.training.presets import PRESETS, unet_arguments

REPOSITORY = Path(__file__).resolve().parent.parent
TRAINERS = ("ours", "example")
# Layouts: a preset's UNet at a resolution, the batch, the steps per epoch and the two lengths in epochs.
MODES = {
    # 128 extra steps: the run-to-run noise of the fixed time (about 0.5 s) moves the time per step by under 2 %.
    "quick": dict(preset="demo", resolution=16, batch_size=32, steps_per_epoch=16, epochs=(2, 10), repeats=2),
    # A step of the 35.7 M-parameter layout takes seconds on one CPU thread: a small batch and few steps.
    "ddpm": dict(
        preset="cifar10-ddpm", resolution=32, batch_size=8, steps_per_epoch=4, epochs=(2, 4), repeats=3
    ),
}
# Larger than any run here: no periodic checkpoint, sample grid or saved pipeline before the end.
NEVER = str(10**9)


def make_image_folder(folder: Path, count: int, resolution: int) -> None:
    """`count` RGB PNGs of smooth random colour fields: the content does not change the cost of a step."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for index in range(count):
        corners = rng.integers(0, 256, size=(2, 2, 3)).astype(np.float32)
        weights = np.linspace(0.0, 1.0, resolution, dtype=np.float32)
        rows = corners[0][None] * (1 - weights[:, None, None]) + corners[1][None] * weights[:, None, None]
        image = rows[:, :1] * (1 - weights[None, :, None]) + rows[:, 1:] * weights[None, :, None]
        PIL.Image.fromarray(image.astype(np.uint8)).save(folder / f"{index:06d}.png")


def write_unet_config(folder: Path, arguments: dict) -> None:
    """The `config.json` that `--model_config_name_or_path` of the example reads."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel", **arguments}, indent=2))


def build_dataset_cache(images: Path, cache: Path) -> None:
    """Builds the `datasets` imagefolder cache that every run then finds, so that no run pays for it."""
    datasets.load_dataset("imagefolder", data_dir=str(images), cache_dir=str(cache))


def launcher(args) -> list[str]:
    return [
        sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
        "--mixed_precision", args.mixed_precision, "--dynamo_backend", "no",
        "--num_cpu_threads_per_process", str(args.threads),
    ]  # fmt: skip


def ours_command(args, images: Path, output_dir: Path, steps: int) -> list[str]:
    return [
        *launcher(args), str(REPOSITORY / "train" / "train_ddpm.py"), "--preset", args.preset,
        "--dataset", str(images), "--resolution", str(args.resolution), "--channels", "3", "--unet", "stock",
        "--no-random_flip", "--train_batch_size", str(args.batch_size), "--max_train_steps", str(steps),
        "--mixed_precision", args.mixed_precision, "--ema_decay", "0.9999",
        "--dataloader_num_workers", str(args.workers), "--report_to", "tensorboard",
        "--checkpointing_steps", NEVER, "--sample_every", "0", "--num_sample_images", "1",
        "--sample_inference_steps", "1", "--eval_every", "0", "--output_dir", str(output_dir),
        *shlex.split(args.ours_args),
    ]  # fmt: skip


def example_command(args, images: Path, config: Path, output_dir: Path, epochs: int) -> list[str]:
    return [
        *launcher(args), str(args.example), "--train_data_dir", str(images), "--resolution", str(args.resolution),
        "--center_crop", "--train_batch_size", str(args.batch_size), "--num_epochs", str(epochs),
        "--model_config_name_or_path", str(config), "--mixed_precision", args.mixed_precision,
        "--use_ema", "--ema_max_decay", "0.9999", "--dataloader_num_workers", str(args.workers),
        "--logger", "tensorboard", "--checkpointing_steps", NEVER, "--save_images_epochs", NEVER,
        "--save_model_epochs", NEVER, "--eval_batch_size", "1", "--ddpm_num_inference_steps", "1",
        "--output_dir", str(output_dir), *shlex.split(args.example_args),
    ]  # fmt: skip


def timed_run(command: list[str], log: Path, environment: dict[str, str]) -> dict[str, float]:
    """Wall seconds and CPU seconds (user + system of the launcher and everything it waited for) of one run."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    with log.open("w") as handle:
        result = subprocess.run(
            command, stdout=handle, stderr=subprocess.STDOUT, cwd=REPOSITORY, env=environment
        )
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if result.returncode != 0:
        tail = log.read_text().strip().splitlines()[-5:]
        raise SystemExit(f"run failed (exit {result.returncode}), see {log}: {' | '.join(tail)}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"wall_s": wall, "cpu_s": cpu}


def split_time(short: dict, long: dict, short_steps: int, long_steps: int) -> dict[str, float]:
    """Per-step and fixed time of one repeat, for wall and CPU seconds."""
    split = {}
    for clock in ("wall", "cpu"):
        per_step = (long[f"{clock}_s"] - short[f"{clock}_s"]) / (long_steps - short_steps)
        split[f"per_step_{clock}_s"] = per_step
        split[f"fixed_{clock}_s"] = short[f"{clock}_s"] - short_steps * per_step
    return split


def offline_environment(cache: Path) -> dict[str, str]:
    """What every trainer run gets: no hub, the prepared datasets cache, output as it comes."""
    return {
        **os.environ,
        "HF_DATASETS_CACHE": str(cache),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1",
    }


def measure(args, work: Path) -> list[dict]:
    images, config, logs = work / "images", work / "unet-config", work / "logs"
    layout = PRESETS[args.preset].settings["unet_config"]
    make_image_folder(images, args.batch_size * args.steps_per_epoch, args.resolution)
    write_unet_config(config, unet_arguments(layout, args.resolution, 3))
    cache = work / "hf-datasets-cache"
    build_dataset_cache(images, cache)
    logs.mkdir(exist_ok=True)
    environment = offline_environment(cache)

    def run(trainer: str, steps: int, log_name: str) -> dict[str, float]:
        output_dir = work / f"run-{trainer}"
        shutil.rmtree(output_dir, ignore_errors=True)
        if trainer == "ours":
            command = ours_command(args, images, output_dir, steps)
        else:
            command = example_command(args, images, config, output_dir, steps // args.steps_per_epoch)
        result = timed_run(command, logs / f"{log_name}.log", environment)
        shutil.rmtree(output_dir, ignore_errors=True)
        return result

    for warmup in range(args.warmup):
        run("ours", args.epochs[0] * args.steps_per_epoch, f"warmup{warmup}-ours")
    lengths = [epochs * args.steps_per_epoch for epochs in args.epochs]
    return interleaved_repeats(run, TRAINERS, lengths, args.repeats)


def interleaved_repeats(run, trainers: tuple[str, ...], lengths: list[int], repeats: int) -> list[dict]:
    """`repeats` rounds of `run(trainer, steps, log_name)` for every trainer at both lengths, shorter length first;
    the trainers' order reverses every round, so none always runs first. Each round's runs are split into time per
    step and fixed time (`split_time`)."""
    results = []
    for repeat in range(repeats):
        runs = {trainer: [] for trainer in trainers}
        for steps in lengths:
            for trainer in trainers if repeat % 2 == 0 else trainers[::-1]:
                result = run(trainer, steps, f"repeat{repeat}-{trainer}-{steps}steps")
                runs[trainer].append(result)
                print(
                    f"repeat {repeat} {trainer:<12}{steps:>5} steps: {result['wall_s']:8.1f} s wall "
                    f"{result['cpu_s']:8.1f} s CPU",
                    flush=True,
                )
        results.append(
            {trainer: {"runs": runs[trainer], **split_time(*runs[trainer], *lengths)} for trainer in trainers}
        )
    return results


def unet_alone(args, steps: int = 20) -> dict[str, float]:
    """Seconds (wall and CPU) of the benchmark UNet's forward, MSE loss and backward alone, in eager mode, median over
    `steps` after one untimed step: no data, optimizer, EMA or logging. No trainer's step can take less, so the
    example's time per step divided by it bounds the per-step ratio any trainer could reach on this layout."""
    torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    precision = {"no": None, "fp16": torch.float16, "bf16": torch.bfloat16}[args.mixed_precision]
    layout = PRESETS[args.preset].settings["unet_config"]
    unet = UNet2DModel(**unet_arguments(layout, args.resolution, 3)).to(device)
    images = torch.randn(args.batch_size, 3, args.resolution, args.resolution, device=device)
    timesteps = torch.randint(0, 1000, (args.batch_size,), device=device)
    times = {"wall": [], "cpu": []}
    for step in range(steps + 1):
        wall, cpu = time.perf_counter(), time.process_time()
        with torch.autocast(device, dtype=precision, enabled=precision is not None):
            loss = torch.nn.functional.mse_loss(unet(images, timesteps).sample.float(), images)
        loss.backward()
        if device == "cuda":
            torch.cuda.synchronize()
        if step:
            times["wall"].append(time.perf_counter() - wall)
            times["cpu"].append(time.process_time() - cpu)
    return {f"{clock}_s": statistics.median(values) for clock, values in times.items()}


def median_times(repeats: list[dict], trainers: tuple[str, ...]) -> dict[str, dict[str, float]]:
    """Each trainer's time per step and fixed time, wall and CPU, medians over the repeats."""
    return {
        trainer: {
            key: statistics.median(repeat[trainer][key] for repeat in repeats)
            for key in ("per_step_wall_s", "per_step_cpu_s", "fixed_wall_s", "fixed_cpu_s")
        }
        for trainer in trainers
    }


def per_repeat_ratios(repeats: list[dict], numerator: str, denominator: str) -> dict[str, list[float]]:
    """Each repeat's time per step of `numerator` over `denominator`'s, wall and CPU: the runs of one repeat are
    minutes apart, so a drift of the machine's speed moves both."""
    return {
        clock: [
            repeat[numerator][f"per_step_{clock}_s"] / repeat[denominator][f"per_step_{clock}_s"]
            for repeat in repeats
        ]
        for clock in ("wall", "cpu")
    }


def summarise(repeats: list[dict], floor: dict[str, float]) -> dict:
    medians = median_times(repeats, TRAINERS)
    paired = per_repeat_ratios(repeats, "example", "ours")
    ratio = {
        clock: medians["example"][f"per_step_{clock}_s"] / medians["ours"][f"per_step_{clock}_s"]
        for clock in ("wall", "cpu")
    }
    return {
        "per_step_ratio": ratio["wall"],
        "per_step_ratio_cpu": ratio["cpu"],
        "per_step_ratio_per_repeat": paired["wall"],
        "per_step_ratio_cpu_per_repeat": paired["cpu"],
        "per_step_seconds": {trainer: medians[trainer]["per_step_wall_s"] for trainer in TRAINERS},
        "per_step_cpu_seconds": {trainer: medians[trainer]["per_step_cpu_s"] for trainer in TRAINERS},
        "fixed_seconds": {trainer: medians[trainer]["fixed_wall_s"] for trainer in TRAINERS},
        "fixed_cpu_seconds": {trainer: medians[trainer]["fixed_cpu_s"] for trainer in TRAINERS},
        "unet_alone_seconds": floor,
        "per_step_ratio_ceiling": {
            clock: medians["example"][f"per_step_{clock}_s"] / floor[f"{clock}_s"]
            for clock in ("wall", "cpu")
        },
    }


def print_report(args, summary: dict) -> None:
    steps = [epochs * args.steps_per_epoch for epochs in args.epochs]
    print(
        f"layout: {args.preset} UNet (stock) at {args.resolution}x{args.resolution} RGB; batch {args.batch_size}; "
        f"precision {args.mixed_precision}; {args.threads} thread(s); {steps[0]} and {steps[1]} steps; "
        f"{args.repeats} interleaved repeats, medians"
    )
    print(f"{'trainer':<10}{'per step wall':>15}{'per step CPU':>14}{'fixed wall':>12}{'fixed CPU':>11}")
    for trainer in TRAINERS:
        print(
            f"{trainer:<10}{summary['per_step_seconds'][trainer]:>14.3f}s{summary['per_step_cpu_seconds'][trainer]:>13.3f}s"
            f"{summary['fixed_seconds'][trainer]:>11.1f}s{summary['fixed_cpu_seconds'][trainer]:>10.1f}s"
        )
    for clock, key in (("wall", "per_step_ratio"), ("CPU", "per_step_ratio_cpu")):
        spread = summary[f"{key}_per_repeat"]
        print(
            f"per-step ratio example/ours ({clock}): {summary[key]:.3f} "
            f"(repeats {min(spread):.3f}-{max(spread):.3f})"
        )
    floor, ceiling = summary["unet_alone_seconds"], summary["per_step_ratio_ceiling"]
    print(
        f"the UNet's forward and backward alone: {floor['wall_s']:.3f} s wall, {floor['cpu_s']:.3f} s CPU per step; "
        f"no trainer's per-step ratio can exceed {ceiling['wall']:.3f} (wall), {ceiling['cpu']:.3f} (CPU)"
    )


def machine_description() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--example", required=True, type=Path, help="diffusers' train_unconditional.py")
    parser.add_argument("--quick", action="store_true", help="the demo UNet at 16x16: minutes on 2 CPU cores")
    parser.add_argument("--preset", choices=list(PRESETS), help="whose UNet layout (default: the mode's)")
    parser.add_argument("--resolution", type=int)
    parser.add_argument("--batch_size", type=int)
    parser.add_argument("--steps_per_epoch", type=int, help="the image folder holds this many batches")
    parser.add_argument("--epochs", type=int, nargs=2, metavar=("SHORT", "LONG"), help="the two lengths")
    parser.add_argument("--repeats", type=int)
    parser.add_argument(
        "--warmup",
        type=int,
        default=0,
        help="untimed short runs of train_ddpm.py first, e.g. to fill the compile cache that --compile uses",
    )
    parser.add_argument("--mixed_precision", default="no", choices=["no", "fp16", "bf16"])
    parser.add_argument("--threads", type=int, default=1, help="CPU threads per trainer process")
    parser.add_argument(
        "--workers", type=int, default=0, help="data loader worker processes of both trainers"
    )
    parser.add_argument("--ours_args", default="", help="extra flags for train_ddpm.py, e.g. '--compile'")
    parser.add_argument("--example_args", default="", help="extra flags for the example")
    parser.add_argument(
        "--work_dir", type=Path, help="keep images and logs here (default: a temporary folder)"
    )
    parser.add_argument("--json_out", type=Path, help="also write the full results to this JSON file")
    args = parser.parse_args()
    mode = MODES["quick" if args.quick else "ddpm"]
    for key, value in mode.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if not args.example.is_file():
        parser.error(f"--example {args.example} is not a file")
    if not 2 <= args.epochs[0] < args.epochs[1]:
        parser.error("--epochs needs 2 <= SHORT < LONG: the example samples and saves after its first epoch")
    args.example = args.example.resolve()

    work = args.work_dir or Path(tempfile.mkdtemp(prefix="trainer-throughput-"))
    # A failed run exits in measure() and leaves the folder, whose logs its message names.
    repeats = measure(args, work)
    if args.work_dir is None:
        shutil.rmtree(work, ignore_errors=True)
    summary = summarise(repeats, unet_alone(args))
    print_report(args, summary)
    settings = {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()}
    result = {**summary, "machine": machine_description(), "settings": settings, "repeats": repeats}
    if args.json_out:
        args.json_out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
