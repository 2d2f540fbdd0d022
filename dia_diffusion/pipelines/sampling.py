"""Sampling a trained model through diffusers' stock DDPMPipeline / DDIMPipeline, one seed per image.

Image i starts from noise drawn by its own CPU `torch.Generator` seeded `seed + i` (the EDM convention), so it is
the same image whatever the batch size, the number of processes or the device. Generation is split across
accelerate processes by contiguous index ranges.

A samples folder (numbered PNGs, grid.png, samples.json) is written into a hidden sibling and swapped in whole once
complete: a failure or Ctrl-C leaves the previous folder as it was, never a folder without its record. One run at a
time writes a given folder (the lock beside it), so the hidden sibling is that run's own.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import PIL.Image
import torch
from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline, DDPMScheduler, DiffusionPipeline, UNet2DModel
from tqdm.auto import tqdm

from dia_diffusion.hub.upload import local_or_hub_folder
from dia_diffusion.pipelines.class_conditional import EVERY_CLASS, ClassConditionalPipeline, ClassSampling
from dia_diffusion.runtime.errors import first_line
from dia_diffusion.runtime.folder_lock import lock_output
from dia_diffusion.runtime.output_files import (
    check_output_path,
    prepare_staging,
    replace_folder,
    staging_path,
    write_error,
)

SCHEDULERS = ("ddpm", "ddim")
SAMPLES_RECORD = "samples.json"
GRID_FILE = "grid.png"
GRID_MAX_IMAGES = 64
# Grids of small images are upscaled (nearest) so that every image is at least this many pixels wide.
GRID_MIN_CELL_PIXELS = 64
_SAMPLE_FILE_PATTERN = re.compile(r"\d{6,}\.png")


class SamplingError(ValueError):
    """A sampling request that cannot run; the message is one line for the user."""


def process_state() -> Any:
    """accelerate's PartialState for this process. Without CUDA, processes started by torchrun or `accelerate
    launch` must ask for CPU explicitly to join as gloo ranks; otherwise each would run alone."""
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def sample_file_name(index: int) -> str:
    return f"{index:06d}.png"


def is_sample_file(name: str) -> bool:
    return _SAMPLE_FILE_PATTERN.fullmatch(name) is not None


def check_output_folder(output: Path) -> None:
    """--output may be replaced only when it does not exist or holds nothing but what sample_to_folder writes."""
    check_output_path(output, "--output", folder=True)
    if output.is_dir():
        foreign = sorted(
            entry.name
            for entry in output.iterdir()
            if not (is_sample_file(entry.name) or entry.name in (GRID_FILE, SAMPLES_RECORD))
        )
        if foreign:
            more = f" and {len(foreign) - 1} more" if len(foreign) > 1 else ""
            raise SamplingError(
                f"--output '{output}' holds files sample.py does not write ({foreign[0]}{more}), which replacing "
                "it would delete; choose another folder"
            )


@contextmanager
def staged_output(output: Path, state: Any) -> Iterator[Path]:
    """Yields an empty hidden sibling of `output` to write into; when the block completes it replaces `output`
    (which `check_output_folder` has cleared for replacing), when it fails (an error, Ctrl-C) it is deleted and
    `output` stays as it was. A failed write (a full disk) raises OutputWriteError naming `output`."""
    target = output.absolute()
    staging = staging_path(target)
    try:
        if state.is_main_process:
            prepare_staging(target)
        state.wait_for_everyone()
        yield staging
        state.wait_for_everyone()
        if state.is_main_process:
            replace_folder(staging, target)
    except OSError as error:
        raise write_error(output, error) from None
    finally:
        if state.is_main_process:
            shutil.rmtree(staging, ignore_errors=True)


def stock_pipeline(
    unet: UNet2DModel, scheduler_config: dict[str, Any], scheduler: str, id2label: dict | None = None
) -> DiffusionPipeline:
    """The stock diffusers pipeline for `scheduler` (a `ClassConditionalPipeline`, knowing the class names
    `id2label`, for a UNet with class embeddings), its scheduler built from the trained noise schedule."""
    if scheduler not in SCHEDULERS:
        raise SamplingError(f"--scheduler must be one of {SCHEDULERS}, got {scheduler!r}")
    scheduler_class = DDPMScheduler if scheduler == "ddpm" else DDIMScheduler
    noise_schedule = scheduler_class.from_config(scheduler_config)
    if unet.config.get("num_class_embeds"):
        pipeline = ClassConditionalPipeline(unet=unet, scheduler=noise_schedule, id2label=id2label)
    elif scheduler == "ddpm":
        pipeline = DDPMPipeline(unet=unet, scheduler=noise_schedule)
    else:
        pipeline = DDIMPipeline(unet=unet, scheduler=noise_schedule)
    # One progress bar counts images; the pipeline's own per-call bar over timesteps would interleave with it.
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def load_pipeline(
    model: str | Path, scheduler: str = "ddim", dtype: torch.dtype = torch.float32
) -> DiffusionPipeline:
    """Loads a saved pipeline (DIA or stock UNet) into the stock pipeline for `scheduler`: a folder, or a hub name
    fetched through the hub cache (the cache alone when the hub cannot be reached)."""
    if scheduler not in SCHEDULERS:
        raise SamplingError(f"--scheduler must be one of {SCHEDULERS}, got {scheduler!r}")
    folder = local_or_hub_folder(model)
    if not (folder / "model_index.json").is_file():
        raise SamplingError(
            f"--model {str(model)!r} is not a saved diffusers pipeline folder (no model_index.json)"
        )
    # diffusers' own loader knows only its own pipeline classes.
    index = json.loads((folder / "model_index.json").read_text())
    loader = (
        ClassConditionalPipeline if index.get("_class_name") == ClassConditionalPipeline.__name__ else None
    )
    try:
        saved = (loader or DiffusionPipeline).from_pretrained(folder, dtype=dtype)
    except OSError as error:
        raise SamplingError(f"--model {str(model)!r} cannot be loaded: {first_line(error)}") from error
    if not hasattr(saved, "unet") or not hasattr(saved, "scheduler"):
        raise SamplingError(
            f"--model {str(model)!r} holds a {type(saved).__name__}, not an unconditional UNet pipeline"
        )
    return stock_pipeline(saved.unet, saved.scheduler.config, scheduler, saved.config.get("id2label"))


def check_sampling_options(
    scheduler: str, num_inference_steps: int, eta: float | None, batch_size: int
) -> None:
    if scheduler not in SCHEDULERS:
        raise SamplingError(f"--scheduler must be one of {SCHEDULERS}, got {scheduler!r}")
    if num_inference_steps < 1:
        raise SamplingError(f"--num_inference_steps must be positive, got {num_inference_steps}")
    if batch_size < 1:
        raise SamplingError(f"--batch_size must be positive, got {batch_size}")
    if eta is not None:
        if scheduler != "ddim":
            raise SamplingError("--eta applies to the ddim scheduler only")
        if not 0.0 <= eta <= 1.0:
            raise SamplingError(f"--eta must lie in [0, 1], got {eta}")


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Pipeline output in [0, 1] → uint8, rounding as diffusers' numpy_to_pil does, so PNGs and tensors agree."""
    return (images.float() * 255).round().clamp(0, 255).to(torch.uint8).cpu()


def pipeline_eta(pipeline: DiffusionPipeline, eta: float | None) -> float | None:
    """The η a DDIM pipeline samples with (None for DDPM), as recorded next to results."""
    return (0.0 if eta is None else eta) if isinstance(pipeline.scheduler, DDIMScheduler) else None


@torch.no_grad()
def generate(
    pipeline: DiffusionPipeline,
    indices: Sequence[int],
    seed: int,
    batch_size: int,
    num_inference_steps: int,
    eta: float | None = None,
    classes: ClassSampling = EVERY_CLASS,
) -> Iterator[tuple[list[int], torch.Tensor]]:
    """Yields (indices, uint8 images [B, C, H, W] on the CPU) batch by batch; image i is seeded `seed + i` (and, for a
    class-conditional pipeline, shows the class `classes` gives it)."""
    classes = classes.for_pipeline(pipeline)
    is_ddim = isinstance(pipeline.scheduler, DDIMScheduler)
    check_sampling_options("ddim" if is_ddim else "ddpm", num_inference_steps, eta, batch_size)
    options: dict[str, Any] = {"eta": pipeline_eta(pipeline, eta)} if is_ddim else {}
    indices = list(indices)
    unet = pipeline.unet
    was_training = unet.training
    # Dropout must be off while sampling, whatever mode the caller left the model in.
    unet.eval()
    try:
        for start in range(0, len(indices), batch_size):
            batch = indices[start : start + batch_size]
            generators = [torch.Generator("cpu").manual_seed(seed + index) for index in batch]
            if isinstance(pipeline, ClassConditionalPipeline):
                options.update(
                    class_labels=classes.labels(batch, pipeline.num_classes),
                    guidance_scale=classes.guidance_scale,
                )
            else:
                options.update(batch_size=len(batch))
            images = pipeline(
                generator=generators, num_inference_steps=num_inference_steps, output_type="pt", **options
            ).images
            yield batch, to_uint8(images)
    finally:
        unet.train(was_training)


def to_pil(image: torch.Tensor) -> PIL.Image.Image:
    """uint8 [C, H, W] → a grey (C = 1) or RGB (C = 3) PIL image."""
    array = image.permute(1, 2, 0).numpy()
    return PIL.Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array)


def enlarged_to_be_seen(images: torch.Tensor) -> torch.Tensor:
    """[N, C, H, W] images enlarged by a whole factor (nearest, so no pixel is blurred) to be at least
    `GRID_MIN_CELL_PIXELS` wide: a grid of 8×8 or 16×16 samples is otherwise a thumbnail."""
    scale = math.ceil(GRID_MIN_CELL_PIXELS / images.shape[-1])
    return (
        torch.nn.functional.interpolate(images, scale_factor=scale, mode="nearest") if scale > 1 else images
    )


def save_grid(folder: Path, num_images: int) -> Path:
    """grid.png of the first (up to 64) numbered images in `folder`, in a square-ish layout, enlarged to be seen."""
    from torchvision.transforms.functional import pil_to_tensor
    from torchvision.utils import make_grid

    count = min(num_images, GRID_MAX_IMAGES)
    images = [pil_to_tensor(PIL.Image.open(folder / sample_file_name(index))) for index in range(count)]
    grid = make_grid(enlarged_to_be_seen(torch.stack(images)), nrow=math.ceil(math.sqrt(count)), padding=2)
    path = folder / GRID_FILE
    to_pil(grid).save(path)
    return path


def sample_to_folder(
    model: str | Path,
    output: str | Path,
    scheduler: str = "ddim",
    num_inference_steps: int = 50,
    eta: float | None = None,
    num_images: int = 64,
    seed: int = 0,
    batch_size: int = 64,
    half: bool = False,
    state: Any = None,
    classes: ClassSampling = EVERY_CLASS,
) -> Path:
    """Writes output/000000.png … , output/grid.png and output/samples.json (how they were made, and for a
    class-conditional model each image's class), replacing a previous samples folder only once the new one is
    complete.

    `state` is an accelerate Accelerator or PartialState; each process generates a contiguous share of the
    indices, and the main process writes the grid and the record once all shares are on disk.
    """
    state = state or process_state()
    if num_images < 1:
        raise SamplingError(f"--num_images must be positive, got {num_images}")
    check_sampling_options(scheduler, num_inference_steps, eta, batch_size)
    if half and state.device.type != "cuda":
        raise SamplingError("--half needs a CUDA GPU (half precision is slow or unsupported on the CPU)")
    dtype = torch.float16 if half else torch.float32
    output = Path(output)
    check_output_folder(output)
    # Before loading: a second run into the same folder is refused at once, not after its model has loaded.
    output_lock = lock_output(output.absolute(), "--output", "sample.py", state)
    try:
        write_samples(
            model,
            output,
            scheduler,
            num_inference_steps,
            eta,
            num_images,
            seed,
            batch_size,
            dtype,
            state,
            classes,
        )
    finally:
        if output_lock is not None:
            output_lock.release()
    return output


def write_samples(
    model: str | Path,
    output: Path,
    scheduler: str,
    num_inference_steps: int,
    eta: float | None,
    num_images: int,
    seed: int,
    batch_size: int,
    dtype: torch.dtype,
    state: Any,
    classes: ClassSampling,
) -> None:
    """`sample_to_folder`'s work, once the checks have passed and the folder is locked."""
    pipeline = load_pipeline(model, scheduler, dtype).to(state.device)
    # Names become ids, and a bad label fails here, before any image is sampled.
    classes = classes.for_pipeline(pipeline)
    with staged_output(output, state) as staging:
        with (
            state.split_between_processes(list(range(num_images))) as indices,
            # The main process's bar counts its own share; the others run the same pace.
            tqdm(
                total=len(indices), desc="sampling", unit="img", disable=not state.is_main_process
            ) as progress,
        ):
            for batch, images in generate(
                pipeline, indices, seed, batch_size, num_inference_steps, eta, classes
            ):
                for index, image in zip(batch, images, strict=True):
                    to_pil(image).save(staging / sample_file_name(index))
                progress.update(len(batch))
        state.wait_for_everyone()
        if state.is_main_process:
            save_grid(staging, num_images)
            record = {
                "model": str(Path(model).resolve()) if Path(model).exists() else str(model),
                "scheduler": scheduler,
                "num_inference_steps": num_inference_steps,
                "eta": pipeline_eta(pipeline, eta),
                "seed": seed,
                "num_images": num_images,
                "dtype": str(dtype).removeprefix("torch."),
                "resolution": pipeline.unet.config.sample_size,
                "channels": pipeline.unet.config.in_channels,
            }
            if isinstance(pipeline, ClassConditionalPipeline):
                record["guidance_scale"] = classes.guidance_scale
                record["class_labels"] = classes.labels(list(range(num_images)), pipeline.num_classes)
            (staging / SAMPLES_RECORD).write_text(json.dumps(record, indent=2) + "\n")
    state.wait_for_everyone()
