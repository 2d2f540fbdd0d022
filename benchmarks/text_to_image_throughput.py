"""Training throughput of `train/train_text_to_image.py` against diffusers' own Stable Diffusion fine-tuning example,
`examples/text_to_image/train_text_to_image.py`, and how far ours stays above the bare work of a step.

    python benchmarks/text_to_image_throughput.py --example PATH/train_text_to_image.py --quick --dia  # 2 CPU cores
    python benchmarks/text_to_image_throughput.py --example PATH/train_text_to_image.py                # more steps
    python benchmarks/text_to_image_throughput.py --layout medium --resolution 128 --batch_size 32 \\
        --mixed_precision bf16 --dia --steps 20 200 --repeats 1                  # on a GPU: ours, stock and DIA

Both trainers fine-tune the stock UNet of one Stable Diffusion pipeline folder on one captioned image folder, both
written offline before the first run (stable_diffusion_fixture.py: the SD 1.x components, small enough that a CPU
step takes a fraction of a second). Same `accelerate launch`, batch, precision, seed, learning rate, EMA (decay
0.9999; the example with `--foreach_ema`, its faster form of the same update), logger (TensorBoard), data loader
workers, resolution, centre crop, no flip, no caption dropout (the example has none) and no gradient accumulation;
no validation or checkpoint before the end. Both encode every batch with the frozen VAE and text encoder at every
step (ours without `--cache_latents`, which only ours has). Ours trains with `--unet stock`: the example cannot carry
DIA. `--dia` adds ours with DIA (`ours_dia`), `--cache_latents` ours encoding once (`ours_cached`); without
`--example` only ours runs. At the end the example saves its pipeline; ours saves it too, with a sample grid (one
image, one denoising step, the least it allows) and a full checkpoint, all in its fixed time.

The timing is trainer_throughput.py's, by its functions: each trainer at two lengths, (long - short) / (extra
steps) its time per step and the rest of the short run its fixed time; interleaved repeats whose order alternates;
medians; CPU seconds beside wall time. Every run goes through benchmarks/peak_memory.py, which records its peak
memory (resident set; on a GPU, CUDA's allocated peak).

The floor. Every step of either trainer must encode the batch (VAE) and its captions (text encoder), run the UNet
forward and backward, and update it with AdamW. These four parts are timed here, one at a time, in this process,
with the same sizes, precision and threads (fused AdamW, torch's fastest), before the trainers' runs and after them;
the medians over both sets of steps add up to the floor, which no trainer that encodes every step can go below. A
trainer's `overhead` = its time per step / floor - 1 is what it adds: data loading, noising, clipping, EMA,
logging. The bare UNet step (forward, backward and AdamW) and the EMA update are reported too, so the encoders'
share and the EMA's are visible. The DIA trainer is measured against the floor of the DIA UNet, the trainer that
encodes once against the bare UNet step.
The last line printed is one JSON object.
"""

import argparse
import json
import os
import shlex
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, UNet2DConditionModel
from stable_diffusion_fixture import (
    CAPTIONS,
    LAYOUTS,
    build_dataset_caches,
    build_pipeline,
    make_captioned_folder,
)
from trainer_throughput import (
    NEVER,
    REPOSITORY,
    interleaved_repeats,
    launcher,
    machine_description,
    median_times,
    offline_environment,
    per_repeat_ratios,
    timed_run,
)
from transformers import CLIPTextModel, CLIPTokenizer

from dia_diffusion.pipelines.apply_dia import apply_dia

PEAK_MEMORY = REPOSITORY / "benchmarks" / "peak_memory.py"
# A step of the small layout takes about 0.6 CPU s; the fixed time varies by a second or two between runs, which
# moves the time per step by about 5 % over 48 extra steps and 2 % over 120.
MODES = {
    "quick": dict(layout="small", resolution=64, batch_size=8, batches=4, steps=(8, 56), repeats=2),
    "full": dict(layout="small", resolution=64, batch_size=8, batches=4, steps=(8, 128), repeats=3),
}
PRECISIONS = {"no": None, "fp16": torch.float16, "bf16": torch.bfloat16}
FLOOR_PARTS = ("vae_encode", "text_encode", "unet_forward_backward", "adamw")


def ours_command(
    args, pipeline: Path, images: Path, output_dir: Path, steps: int, unet: str, cache_latents: bool = False
) -> list[str]:
    return [
        *launcher(args), str(PEAK_MEMORY), str(REPOSITORY / "train" / "train_text_to_image.py"),
        "--pretrained_model", str(pipeline), "--dataset", str(images), "--unet", unet,
        "--resolution", str(args.resolution), "--center_crop", "--no-random_flip", "--caption_dropout", "0",
        "--cache_latents" if cache_latents else "--no-cache_latents", "--train_batch_size", str(args.batch_size),
        "--gradient_accumulation_steps", "1", "--max_train_steps", str(steps), "--learning_rate", "1e-5",
        "--mixed_precision", args.mixed_precision, "--ema_decay", "0.9999", "--seed", "0",
        "--dataloader_num_workers", str(args.workers),
        "--report_to", "tensorboard", "--checkpointing_steps", NEVER, "--sample_every", "0",
        "--num_sample_images", "1", "--sample_inference_steps", "1", "--validation_prompts", CAPTIONS[0],
        "--output_dir", str(output_dir), *shlex.split(args.ours_args),
    ]  # fmt: skip


def example_command(args, pipeline: Path, images: Path, output_dir: Path, steps: int) -> list[str]:
    # No --validation_prompts: the example then neither validates nor samples at the end.
    return [
        *launcher(args), str(PEAK_MEMORY), str(args.example), "--pretrained_model_name_or_path", str(pipeline),
        "--train_data_dir", str(images), "--resolution", str(args.resolution), "--center_crop",
        "--train_batch_size", str(args.batch_size), "--gradient_accumulation_steps", "1",
        "--max_train_steps", str(steps), "--learning_rate", "1e-5", "--lr_warmup_steps", "0",
        "--mixed_precision", args.mixed_precision, "--use_ema", "--foreach_ema", "--seed", "0",
        "--dataloader_num_workers", str(args.workers), "--report_to", "tensorboard",
        "--checkpointing_steps", NEVER, "--output_dir", str(output_dir), *shlex.split(args.example_args),
    ]  # fmt: skip


def trainers_of(args) -> tuple[str, ...]:
    optional = {"example": args.example, "ours_dia": args.dia, "ours_cached": args.cache_latents}
    return ("ours", *(trainer for trainer, wanted in optional.items() if wanted))


def floor_of(trainer: str, floors: dict[str, dict]) -> dict[str, float]:
    """The least a trainer's step can take: the floor of the UNet it trains, without the encoders when it encodes
    once (`--cache_latents`)."""
    if trainer == "ours_cached":
        return floors["stock"]["unet_step"]
    return floors["dia" if trainer == "ours_dia" else "stock"]


def measure(args, work: Path, pipeline: Path) -> list[dict]:
    images, logs, cache = work / "images", work / "logs", work / "hf-datasets-cache"
    make_captioned_folder(images, args.batch_size * args.batches, args.resolution)
    build_dataset_caches(images, cache)
    logs.mkdir(exist_ok=True)
    environment = offline_environment(cache)

    def run(trainer: str, steps: int, log_name: str) -> dict:
        output_dir = work / f"run-{trainer}"
        shutil.rmtree(output_dir, ignore_errors=True)
        if trainer == "example":
            command = example_command(args, pipeline, images, output_dir, steps)
        else:
            unet = "dia" if trainer == "ours_dia" else "stock"
            command = ours_command(args, pipeline, images, output_dir, steps, unet, trainer == "ours_cached")
        peak_file = logs / f"{log_name}.memory.json"
        result = timed_run(
            command, logs / f"{log_name}.log", {**environment, "PEAK_MEMORY_JSON": str(peak_file)}
        )
        shutil.rmtree(output_dir, ignore_errors=True)
        return {**result, "peak_memory": json.loads(peak_file.read_text())}

    return interleaved_repeats(run, trainers_of(args), list(args.steps), args.repeats)


def floor_times(args, pipeline: Path, variant: str) -> dict:
    """Seconds (wall and CPU) of each part of the work every step must do, timed one part at a time over
    `floor_steps` steps after one untimed step, for the stock UNet of `pipeline` or its DIA retrofit; on CUDA, also
    the peak memory they allocate."""
    torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    precision = PRECISIONS[args.mixed_precision]
    # As both trainers do: the frozen encoders in the training precision, the UNet in fp32 under autocast.
    encoder_dtype = precision or torch.float32
    vae = AutoencoderKL.from_pretrained(pipeline, subfolder="vae").to(device, encoder_dtype)
    text_encoder = CLIPTextModel.from_pretrained(pipeline, subfolder="text_encoder").to(device, encoder_dtype)
    unet = UNet2DConditionModel.from_pretrained(pipeline, subfolder="unet")
    unet = (apply_dia(unet) if variant == "dia" else unet).to(device).train()
    tokenizer = CLIPTokenizer.from_pretrained(pipeline, subfolder="tokenizer")
    captions = [CAPTIONS[index % len(CAPTIONS)] for index in range(args.batch_size)]
    input_ids = tokenizer(
        captions,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids.to(device)
    pixels = torch.rand(args.batch_size, 3, args.resolution, args.resolution, device=device) * 2 - 1
    pixels = pixels.to(encoder_dtype)
    parameters = list(unet.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=1e-5, fused=True)
    average = [parameter.detach().clone() for parameter in parameters]

    def mark() -> tuple[float, float]:
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter(), time.process_time()

    times = {part: {"wall": [], "cpu": []} for part in (*FLOOR_PARTS, "ema")}
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for step in range(args.floor_steps + 1):
        marks = [mark()]
        with torch.no_grad():
            latents = (vae.encode(pixels).latent_dist.sample() * vae.config.scaling_factor).float()
        marks.append(mark())
        with torch.no_grad():
            states = text_encoder(input_ids, return_dict=False)[0].float()
        marks.append(mark())
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, 1000, (args.batch_size,), device=device)
        with torch.autocast(device, dtype=precision, enabled=precision is not None):
            prediction = unet(latents + noise, timesteps, states).sample
        F.mse_loss(prediction.float(), noise).backward()
        marks.append(mark())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        marks.append(mark())
        with torch.no_grad():
            torch._foreach_lerp_(average, parameters, 1 - 0.9999)
        marks.append(mark())
        if step:
            for part, start, end in zip(times, marks, marks[1:]):
                times[part]["wall"].append(end[0] - start[0])
                times[part]["cpu"].append(end[1] - start[1])
    peak = {"cuda_max_allocated_bytes": torch.cuda.max_memory_allocated()} if device == "cuda" else {}
    return {"times": times, **peak}


def floor_summary(samples: list[dict]) -> dict:
    """Medians of each part over the steps of every sample (one before the trainers' runs, one after, so that a
    machine whose speed drifts during the runs is met on both sides), and the floor: the sum of FLOOR_PARTS."""
    parts = {
        part: {
            f"{clock}_s": statistics.median(
                value for sample in samples for value in sample["times"][part][clock]
            )
            for clock in ("wall", "cpu")
        }
        for part in samples[0]["times"]
    }
    result = {
        "parts": parts,
        **{f"{clock}_s": sum(parts[part][f"{clock}_s"] for part in FLOOR_PARTS) for clock in ("wall", "cpu")},
        "unet_step": {
            f"{clock}_s": parts["unet_forward_backward"][f"{clock}_s"] + parts["adamw"][f"{clock}_s"]
            for clock in ("wall", "cpu")
        },
    }
    if "cuda_max_allocated_bytes" in samples[0]:
        result["cuda_max_allocated_bytes"] = max(sample["cuda_max_allocated_bytes"] for sample in samples)
    return result


def summarise(repeats: list[dict], floors: dict[str, dict], trainers: tuple[str, ...]) -> dict:
    medians = median_times(repeats, trainers)
    summary = {
        "trainers": list(trainers),
        "per_step_seconds": {trainer: medians[trainer]["per_step_wall_s"] for trainer in trainers},
        "per_step_cpu_seconds": {trainer: medians[trainer]["per_step_cpu_s"] for trainer in trainers},
        "fixed_seconds": {trainer: medians[trainer]["fixed_wall_s"] for trainer in trainers},
        "fixed_cpu_seconds": {trainer: medians[trainer]["fixed_cpu_s"] for trainer in trainers},
        "floor": floors,
        # Each trainer against the floor of the UNet it trains.
        "overhead": {
            trainer: {
                clock: medians[trainer][f"per_step_{clock}_s"] / floor_of(trainer, floors)[f"{clock}_s"] - 1
                for clock in ("wall", "cpu")
            }
            for trainer in trainers
        },
        # The largest peak of each trainer's runs (they differ only in length).
        "peak_memory": {
            trainer: {
                key: max(run["peak_memory"][key] for repeat in repeats for run in repeat[trainer]["runs"])
                for key in repeats[0][trainer]["runs"][0]["peak_memory"]
            }
            for trainer in trainers
        },
    }
    pairs = {"per_step_ratio": ("example", "ours"), "dia_per_step_ratio": ("ours_dia", "ours")}
    for name, (numerator, denominator) in pairs.items():
        if numerator not in trainers:
            continue
        paired = per_repeat_ratios(repeats, numerator, denominator)
        for clock, suffix in (("wall", ""), ("cpu", "_cpu")):
            summary[f"{name}{suffix}"] = (
                medians[numerator][f"per_step_{clock}_s"] / medians[denominator][f"per_step_{clock}_s"]
            )
            summary[f"{name}{suffix}_per_repeat"] = paired[clock]
    if "example" in trainers:
        summary["per_step_ratio_ceiling"] = {
            clock: medians["example"][f"per_step_{clock}_s"] / floors["stock"][f"{clock}_s"]
            for clock in ("wall", "cpu")
        }
    return summary


def print_report(args, summary: dict) -> None:
    print(
        f"layout: {args.layout} SD pipeline at {args.resolution}x{args.resolution}; batch {args.batch_size}; "
        f"precision {args.mixed_precision}; {args.threads} thread(s); {args.steps[0]} and {args.steps[1]} steps; "
        f"{args.repeats} interleaved repeats, medians"
    )
    print(
        f"{'trainer':<12}{'per step wall':>15}{'per step CPU':>14}{'fixed wall':>12}{'fixed CPU':>11}"
        f"{'overhead CPU':>14}{'peak memory':>13}"
    )
    for trainer in summary["trainers"]:
        memory = summary["peak_memory"][trainer]
        peak = memory.get("cuda_max_allocated_bytes", memory["max_rss_bytes"]) / 2**20
        print(
            f"{trainer:<12}{summary['per_step_seconds'][trainer]:>14.3f}s"
            f"{summary['per_step_cpu_seconds'][trainer]:>13.3f}s{summary['fixed_seconds'][trainer]:>11.1f}s"
            f"{summary['fixed_cpu_seconds'][trainer]:>10.1f}s{summary['overhead'][trainer]['cpu']:>13.1%}"
            f"{peak:>10.0f} MB"
        )
    for variant, parts in summary["floor"].items():
        listed = ", ".join(f"{part} {times['cpu_s']:.4f}" for part, times in parts["parts"].items())
        print(
            f"floor ({variant} UNet): {parts['wall_s']:.3f} s wall, {parts['cpu_s']:.3f} s CPU = {listed} (CPU s)"
        )
    for key, label in (("per_step_ratio", "example/ours"), ("dia_per_step_ratio", "ours_dia/ours")):
        for clock, suffix in (("wall", ""), ("CPU", "_cpu")):
            if f"{key}{suffix}" in summary:
                spread = summary[f"{key}{suffix}_per_repeat"]
                print(
                    f"per-step ratio {label} ({clock}): {summary[key + suffix]:.3f} "
                    f"(repeats {min(spread):.3f}-{max(spread):.3f})"
                )


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--example", type=Path, help="diffusers' train_text_to_image.py (default: ours only)")
    parser.add_argument("--dia", action="store_true", help="also ours with DIA (ours_dia)")
    parser.add_argument(
        "--cache_latents",
        action="store_true",
        help="also ours encoding every image and caption once (ours_cached), against the bare UNet step",
    )
    parser.add_argument(
        "--quick", action="store_true", help="fewer steps and repeats: minutes on 2 CPU cores"
    )
    parser.add_argument("--layout", choices=list(LAYOUTS))
    parser.add_argument("--resolution", type=int, help="pixels")
    parser.add_argument("--batch_size", type=int)
    parser.add_argument("--batches", type=int, help="the image folder holds this many batches")
    parser.add_argument("--steps", type=int, nargs=2, metavar=("SHORT", "LONG"), help="the two lengths")
    parser.add_argument("--repeats", type=int)
    parser.add_argument("--floor_steps", type=int, default=12, help="timed steps of the floor, per UNet")
    parser.add_argument("--mixed_precision", default="no", choices=list(PRECISIONS))
    parser.add_argument("--threads", type=int, default=1, help="CPU threads per trainer process")
    parser.add_argument(
        "--workers", type=int, default=0, help="data loader worker processes of both trainers"
    )
    parser.add_argument(
        "--ours_args", default="", help="extra flags for train_text_to_image.py, e.g. '--compile'"
    )
    parser.add_argument("--example_args", default="", help="extra flags for the example")
    parser.add_argument("--work_dir", type=Path, help="keep the pipeline, images and logs here")
    parser.add_argument("--json_out", type=Path, help="also write the full results to this JSON file")
    args = parser.parse_args(argv)
    for key, value in MODES["quick" if args.quick else "full"].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.example is not None and not args.example.is_file():
        parser.error(f"--example {args.example} is not a file")
    if not 1 <= args.steps[0] < args.steps[1]:
        parser.error("--steps needs 1 <= SHORT < LONG")
    if args.example is not None:
        args.example = args.example.resolve()
    return args


def main() -> None:
    args = parse_arguments()
    load_before = os.getloadavg()
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="text-to-image-throughput-"))
    work.mkdir(parents=True, exist_ok=True)
    pipeline = build_pipeline(work, args.layout, args.resolution)
    # A failed run exits in measure() and leaves the folder, whose logs its message names.
    variants = ("stock", "dia") if args.dia else ("stock",)
    before = {variant: floor_times(args, pipeline, variant) for variant in variants}
    repeats = measure(args, work, pipeline)
    floors = {
        variant: floor_summary([before[variant], floor_times(args, pipeline, variant)])
        for variant in variants
    }
    if args.work_dir is None:
        shutil.rmtree(work, ignore_errors=True)
    summary = summarise(repeats, floors, trainers_of(args))
    print_report(args, summary)
    settings = {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()}
    machine = {
        "description": machine_description(),
        "load_average_1min": [load_before[0], os.getloadavg()[0]],
    }
    result = {**summary, "machine": machine, "settings": settings, "repeats": repeats}
    if args.json_out:
        args.json_out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
