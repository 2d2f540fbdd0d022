"""One DDPM training run: a resolved `TrainingConfig` in, a diffusers `DDPMPipeline` folder out.

`resolve_config` turns a preset plus overrides into the config; `train` runs it under accelerate:
1. accelerator  2. inputs checked (nothing is written before they pass)  3. model, EMA, optimizer, data
4. resume  5. the loop  6. the final EMA pipeline.

Exactness on resume rests on three choices: the data order is a pure function of (seed, epoch); every random draw
of the loop (flips, noise, timesteps, dropout) comes from the global RNGs that accelerate checkpoints per process;
and sampling/evaluation run inside `torch.random.fork_rng`, so they never shift those streams.
"""

import json
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from accelerate import Accelerator
from accelerate.utils import GradientAccumulationPlugin, ProjectConfiguration, set_seed
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
from diffusers.optimization import SchedulerType, get_scheduler
from diffusers.training_utils import EMAModel
from torch.utils.data import DataLoader, Sampler
from tqdm.auto import tqdm

from dia_diffusion.checkpointing import (
    CHECKPOINTS_DIRNAME,
    check_output_dir,
    find_latest_checkpoint,
    load_checkpoint,
    publish_pipeline,
    resolve_resume_checkpoint,
    save_checkpoint,
    write_run_record,
)
from dia_diffusion.data import load_image_dataset
from dia_diffusion.decoded_images import training_pixels
from dia_diffusion.evaluation import PipelineEvaluator
from dia_diffusion.feature_extractors import MissingWeightsError
from dia_diffusion.presets import PRESETS, UNET_VARIANTS, build_unet, unet_arguments

TRACKER_PROJECT = "train_ddpm"
METRICS_FILENAME = "metrics.jsonl"
SAMPLES_DIRNAME = "samples"
# diffusers' EMAModel warmup: decay = 1 - (1 + step)^-power, capped at ema_decay; 3/4 suits runs of ~10k steps.
EMA_WARMUP_POWER = 0.75
# Sample grids are upscaled (nearest) so that every image is at least this many pixels wide.
GRID_MIN_CELL_PIXELS = 64

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
MIXED_PRECISION_MODES = ("no", "fp16", "bf16")
LOGGERS = ("tensorboard", "none")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid")
VARIANCE_TYPES = ("fixed_small", "fixed_large")


class TrainingConfigError(ValueError):
    """A setting that cannot work; the message is one line naming the flag."""


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the message names the step and the last good checkpoint."""


@dataclass(frozen=True)
class TrainingConfig:
    """Everything a run depends on. Field names are the flags of train/train_ddpm.py."""

    output_dir: str
    preset: str = "demo"
    # data
    dataset: str = "digits"
    image_column: str | None = None
    resolution: int = 8
    channels: int = 1
    random_flip: bool = False
    dataloader_num_workers: int = 0
    # model: UNet2DModel arguments except sample_size / in_channels / out_channels, which follow the data
    unet: str = "dia"
    unet_config: dict[str, Any] = field(default_factory=dict)
    dia_sharing: str = "global"
    dia_reduction: int = 4
    dia_hidden_channels: int | None = None
    dia_gate: str = "sigmoid"
    gradient_checkpointing: bool = False
    compile: bool = False
    # diffusion
    num_train_timesteps: int = 1000
    beta_schedule: str = "linear"
    variance_type: str = "fixed_small"
    prediction_type: str = "epsilon"
    # optimisation (train_batch_size is per process)
    max_train_steps: int = 1000
    train_batch_size: int = 64
    gradient_accumulation_steps: int = 1
    learning_rate: float = 1e-4
    lr_scheduler: str = "constant_with_warmup"
    lr_warmup_steps: int = 0
    adam_weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    mixed_precision: str = "no"
    seed: int = 0
    ema_decay: float = 0.9999
    ema_warmup: bool = False
    # checkpoints, logs, samples, evaluation (0 = only at the end for samples, never for evaluation)
    checkpointing_steps: int = 1000
    checkpoints_total_limit: int = 0
    resume_from_checkpoint: str | None = None
    log_every: int = 10
    logger: str = "tensorboard"
    sample_every: int = 0
    num_sample_images: int = 64
    sample_inference_steps: int = 1000
    eval_every: int = 0
    eval_feature: str = "classifier"
    eval_num_samples: int = 500
    eval_inference_steps: int = 50

    def unet_arguments(self) -> dict[str, Any]:
        return unet_arguments(self.unet_config, self.resolution, self.channels)

    def dia_options(self) -> dict[str, Any]:
        return {
            "dia_sharing": self.dia_sharing,
            "dia_reduction": self.dia_reduction,
            "dia_hidden_channels": self.dia_hidden_channels,
            "dia_gate": self.dia_gate,
        }


# Settings that may change between invocations of one run without making it a different run.
RUN_NEUTRAL_FIELDS = (
    "output_dir",
    "resume_from_checkpoint",
    "max_train_steps",
    "dataloader_num_workers",
    "gradient_checkpointing",
    "compile",
    "checkpointing_steps",
    "checkpoints_total_limit",
    "log_every",
    "logger",
    "sample_every",
    "num_sample_images",
    "sample_inference_steps",
    "eval_every",
    "eval_feature",
    "eval_num_samples",
    "eval_inference_steps",
)


@dataclass
class TrainingResult:
    global_step: int
    unet: UNet2DModel  # the trained (non-EMA) weights
    ema: EMAModel


def resolve_config(preset: str, overrides: dict[str, Any]) -> TrainingConfig:
    """The preset's settings, then every override that is not None."""
    if preset not in PRESETS:
        raise TrainingConfigError(f"unknown --preset {preset!r}; choose one of {', '.join(PRESETS)}")
    known = {item.name for item in fields(TrainingConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise TrainingConfigError(f"unknown setting(s) {', '.join(unknown)}")
    settings = {**PRESETS[preset].settings, **{k: v for k, v in overrides.items() if v is not None}}
    config = TrainingConfig(**{**settings, "preset": preset})
    validate_config(config)
    return config


def validate_config(config: TrainingConfig) -> None:
    """Raises TrainingConfigError naming the first flag whose value cannot work."""
    choices = {
        "unet": UNET_VARIANTS,
        "prediction_type": PREDICTION_TYPES,
        "mixed_precision": MIXED_PRECISION_MODES,
        "logger": LOGGERS,
        "lr_scheduler": [kind.value for kind in SchedulerType],
        "beta_schedule": BETA_SCHEDULES,
        "variance_type": VARIANCE_TYPES,
        "channels": (1, 3),
    }
    for name, allowed in choices.items():
        if getattr(config, name) not in allowed:
            raise TrainingConfigError(
                f"--{name} must be one of {', '.join(map(str, allowed))}, got {getattr(config, name)!r}"
            )
    positive = (
        "resolution",
        "max_train_steps",
        "train_batch_size",
        "gradient_accumulation_steps",
        "learning_rate",
        "max_grad_norm",
        "checkpointing_steps",
        "log_every",
        "num_sample_images",
        "sample_inference_steps",
        "eval_num_samples",
        "eval_inference_steps",
        "num_train_timesteps",
    )
    for name in positive:
        if not getattr(config, name) > 0:
            raise TrainingConfigError(f"--{name} must be positive, got {getattr(config, name)!r}")
    not_negative = (
        "lr_warmup_steps",
        "checkpoints_total_limit",
        "sample_every",
        "eval_every",
        "dataloader_num_workers",
        "adam_weight_decay",
    )
    for name in not_negative:
        if getattr(config, name) < 0:
            raise TrainingConfigError(f"--{name} must not be negative, got {getattr(config, name)!r}")
    if not 0.0 < config.ema_decay < 1.0:
        raise TrainingConfigError(f"--ema_decay must be between 0 and 1, got {config.ema_decay!r}")
    # Each level but the last halves the image, so the resolution must survive len(block_out_channels) - 1 halvings.
    levels = len(config.unet_config.get("block_out_channels", ()))
    divisor = 2 ** max(levels - 1, 0)
    if config.resolution % divisor:
        raise TrainingConfigError(
            f"--resolution {config.resolution} cannot be divided by {divisor}, which the UNet's {levels} levels "
            f"need; use a multiple of {divisor}"
        )


def run_record(config: TrainingConfig, num_processes: int) -> dict[str, Any]:
    """What `training_config.json` holds: the resolved config, plus the process count the data order depends on."""
    return {**asdict(config), "num_processes": num_processes}


def train(config: TrainingConfig) -> TrainingResult:
    """Runs (or resumes) the training described by `config`; every process of an accelerate launch calls it."""
    output_dir = Path(config.output_dir)
    checkpoints_dir = output_dir / CHECKPOINTS_DIRNAME

    # 1. Accelerator. The config, not the launcher's environment, decides precision and compilation.
    accelerator = Accelerator(
        mixed_precision=config.mixed_precision,
        dynamo_backend="inductor" if config.compile else "no",
        gradient_accumulation_plugin=GradientAccumulationPlugin(
            num_steps=config.gradient_accumulation_steps, sync_with_dataloader=False
        ),
        # Stepped by hand once per optimizer step; accelerate would otherwise step it once per process.
        step_scheduler_with_optimizer=False,
        log_with="tensorboard" if config.logger == "tensorboard" else None,
        project_config=ProjectConfiguration(
            project_dir=str(output_dir), logging_dir=str(output_dir / "logs")
        ),
    )
    # Identical on every process, so every process builds the same initial weights and EMA.
    set_seed(config.seed)

    # 2. Inputs: every check that can fail runs before the first file is written.
    dataset = load_image_dataset(config.dataset, "train", config.image_column)
    images_per_step = config.train_batch_size * accelerator.num_processes
    if len(dataset) < images_per_step:
        raise TrainingConfigError(
            f"--dataset {config.dataset!r} has {len(dataset)} images, fewer than one batch of {images_per_step} "
            f"(--train_batch_size {config.train_batch_size} x {accelerator.num_processes} processes)"
        )
    try:
        unet = build_unet(config.unet, config.unet_arguments(), config.dia_options())
    except ValueError as error:
        raise TrainingConfigError(
            f"the UNet of --preset {config.preset} with these flags cannot be built: {error}"
        ) from None
    resume_path = None
    if config.resume_from_checkpoint is not None:
        resume_path = resolve_resume_checkpoint(checkpoints_dir, config.resume_from_checkpoint)
    record = run_record(config, accelerator.num_processes)
    check_output_dir(
        output_dir, record, RUN_NEUTRAL_FIELDS, resuming=config.resume_from_checkpoint is not None
    )
    evaluator = make_evaluator(config, accelerator) if config.eval_every else None
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_run_record(output_dir, record)

    # 3. Model, EMA, optimizer, data.
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    ema, optimizer = make_ema(unet, config), make_optimizer(unet, config)
    lr_scheduler = get_scheduler(
        config.lr_scheduler,
        optimizer,
        num_warmup_steps=config.lr_warmup_steps,
        num_training_steps=config.max_train_steps,
    )
    noise_scheduler = DDPMScheduler(
        num_train_timesteps=config.num_train_timesteps,
        beta_schedule=config.beta_schedule,
        variance_type=config.variance_type,
        prediction_type=config.prediction_type,
    )
    train_dataloader = make_dataloader(dataset, config)
    unet, optimizer, train_dataloader, lr_scheduler = accelerator.prepare(
        unet, optimizer, train_dataloader, lr_scheduler
    )
    ema.to(accelerator.device)
    accelerator.register_for_checkpointing(ema)
    # From here on each process draws its own flips, noise and timesteps.
    set_seed(config.seed, device_specific=True)

    # 4. Resume: weights, optimizer, LR schedule, EMA and every process's RNG states.
    global_step = 0
    if resume_path is not None:
        global_step = load_checkpoint(accelerator, resume_path)
        # accelerate loads registered objects onto the CPU.
        ema.to(accelerator.device)
        accelerator.print(f"resumed from {resume_path} at step {global_step}")
    accelerator.print(
        f"effective batch size {images_per_step * config.gradient_accumulation_steps} = {config.train_batch_size} "
        f"per process x {accelerator.num_processes} processes x {config.gradient_accumulation_steps} accumulation "
        f"steps; {len(dataset)} images; {sum(p.numel() for p in unet.parameters()):,} parameters ({config.unet} UNet)"
    )

    # 5. The loop.
    metrics = (
        MetricsLog(output_dir / METRICS_FILENAME, keep_until_step=global_step)
        if accelerator.is_main_process
        else None
    )
    if config.logger == "tensorboard":
        accelerator.init_trackers(TRACKER_PROJECT, config=tracker_hyperparameters(config))
    progress = tqdm(
        total=config.max_train_steps,
        initial=global_step,
        desc="steps",
        disable=not accelerator.is_main_process,
    )
    sampling_scheduler = DDPMScheduler.from_config(noise_scheduler.config)
    log_window = LogWindow(images_per_step * config.gradient_accumulation_steps)
    epoch, batches_to_skip = divmod(global_step * config.gradient_accumulation_steps, len(train_dataloader))
    try:
        clock = time.perf_counter()
        while global_step < config.max_train_steps:
            train_dataloader.set_epoch(epoch)
            batches = train_dataloader
            if batches_to_skip:
                # Resuming mid-epoch: skip the batches this epoch already used without loading them.
                batches = accelerator.skip_first_batches(train_dataloader, batches_to_skip)
                batches_to_skip = 0
            for batch in batches:
                with accelerator.accumulate(unet):
                    losses = training_step(accelerator, unet, optimizer, noise_scheduler, batch, config)
                    if not torch.isfinite(losses).all():
                        raise NonFiniteLossError(
                            f"the loss became {losses[~torch.isfinite(losses)][0].item()} at step {global_step + 1}; "
                            "training stopped before that step's update "
                            f"(last good checkpoint: {find_latest_checkpoint(checkpoints_dir) or 'none'})"
                        )
                log_window.add_batch(losses.mean().item())
                if not accelerator.sync_gradients:
                    continue
                learning_rate = lr_scheduler.get_last_lr()[0]
                lr_scheduler.step()
                ema.step(unet.parameters())
                global_step += 1
                log_window.add_step(time.perf_counter() - clock)
                progress.update(1)

                is_last = global_step == config.max_train_steps
                row: dict[str, float] = {}
                if global_step % config.log_every == 0 or is_last:
                    row = log_window.close(learning_rate)
                    progress.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{learning_rate:.2e}")
                if global_step % config.checkpointing_steps == 0 or is_last:
                    save_checkpoint(
                        accelerator, checkpoints_dir, global_step, config.checkpoints_total_limit or None
                    )
                if (config.sample_every and global_step % config.sample_every == 0) or is_last:
                    with ema_weights(ema, unet, accelerator.device):
                        if accelerator.is_main_process:
                            pipeline = make_pipeline(accelerator.unwrap_model(unet), sampling_scheduler)
                            grid_path = output_dir / SAMPLES_DIRNAME / f"step-{global_step:07d}.png"
                            write_sample_grid(pipeline, config, grid_path)
                    accelerator.wait_for_everyone()
                if evaluator is not None and (global_step % config.eval_every == 0 or is_last):
                    with ema_weights(ema, unet, accelerator.device):
                        row.update(
                            evaluator(make_pipeline(accelerator.unwrap_model(unet), sampling_scheduler))
                        )
                if row:
                    accelerator.log(row, step=global_step)
                    if metrics is not None:
                        metrics.write(global_step, row)
                if is_last:
                    break
                clock = time.perf_counter()
            epoch += 1

        # 6. The final pipeline, with the EMA weights.
        with ema_weights(ema, unet, accelerator.device):
            if accelerator.is_main_process:
                pipeline = make_pipeline(accelerator.unwrap_model(unet), sampling_scheduler)
                publish_pipeline(pipeline.save_pretrained, output_dir)
        accelerator.wait_for_everyone()
    finally:
        progress.close()
        if metrics is not None:
            metrics.close()
        accelerator.end_training()
    return TrainingResult(global_step=global_step, unet=accelerator.unwrap_model(unet), ema=ema)


class EpochShuffleSampler(Sampler[int]):
    """A fresh permutation of the dataset every epoch, a pure function of (seed, epoch).

    Resuming therefore needs no sampler state, and every process draws the same permutation, which accelerate
    then deals out between them. accelerate calls `set_epoch` at the start of each pass.
    """

    def __init__(self, size: int, seed: int) -> None:
        self.size = size
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[int]:
        yield from np.random.default_rng([self.seed, self.epoch]).permutation(self.size).tolist()


# The EMA and the optimizer update every parameter tensor (~200 of them) with one multi-tensor kernel instead of a
# Python loop over them: several milliseconds per step for a small UNet on the CPU, and fewer kernel launches on a GPU.
def make_ema(unet: UNet2DModel, config: TrainingConfig) -> EMAModel:
    return EMAModel(
        unet.parameters(),
        decay=config.ema_decay,
        use_ema_warmup=config.ema_warmup,
        power=EMA_WARMUP_POWER,
        model_cls=type(unet),
        model_config=unet.config,
        foreach=True,
    )


def make_optimizer(unet: UNet2DModel, config: TrainingConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(
        unet.parameters(), lr=config.learning_rate, weight_decay=config.adam_weight_decay, fused=True
    )


def make_dataloader(dataset, config: TrainingConfig) -> DataLoader:
    # The flip happens in the loop, from the checkpointed RNG: a flip inside the transform would be drawn while
    # accelerate pre-fetches the next batch, one batch ahead of the checkpoint.
    return DataLoader(
        training_pixels(dataset, config.resolution, config.channels),
        batch_size=config.train_batch_size,
        sampler=EpochShuffleSampler(len(dataset), config.seed),
        drop_last=True,
        num_workers=config.dataloader_num_workers,
        # Seeds the worker processes, so a run with workers is as repeatable as one without.
        generator=torch.Generator().manual_seed(config.seed),
    )


def training_step(
    accelerator: Accelerator,
    unet: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    noise_scheduler: DDPMScheduler,
    batch: dict[str, torch.Tensor],
    config: TrainingConfig,
) -> torch.Tensor:
    """One micro-batch: loss, backward, and (at the end of an accumulation window) the clipped optimizer step.

    Returns every process's loss. When any is not finite nothing is updated: the caller stops the run.
    """
    clean_images = batch["pixel_values"]
    if config.random_flip:
        clean_images = random_horizontal_flip(clean_images)
    loss = diffusion_loss(unet, noise_scheduler, clean_images)
    losses = accelerator.gather(loss.detach()[None])
    if not torch.isfinite(losses).all():
        return losses
    accelerator.backward(loss)
    if accelerator.sync_gradients:
        accelerator.clip_grad_norm_(unet.parameters(), config.max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return losses


def random_horizontal_flip(images: torch.Tensor) -> torch.Tensor:
    flip = torch.rand(images.shape[0], device=images.device) < 0.5
    return torch.where(flip[:, None, None, None], images.flip(-1), images)


def diffusion_loss(
    unet: torch.nn.Module, noise_scheduler: DDPMScheduler, clean_images: torch.Tensor
) -> torch.Tensor:
    """DDPM's simple loss (Ho et al. 2020, eq. 14) for the scheduler's prediction type."""
    noise = torch.randn_like(clean_images)
    timesteps = torch.randint(
        0, noise_scheduler.config.num_train_timesteps, (clean_images.shape[0],), device=clean_images.device
    )
    noisy_images = noise_scheduler.add_noise(clean_images, noise, timesteps)
    prediction = unet(noisy_images, timesteps).sample
    prediction_type = noise_scheduler.config.prediction_type
    if prediction_type == "epsilon":
        target = noise
    elif prediction_type == "sample":
        target = clean_images
    else:
        target = noise_scheduler.get_velocity(clean_images, noise, timesteps)
    return F.mse_loss(prediction.float(), target.float())


@contextmanager
def ema_weights(ema: EMAModel, unet: torch.nn.Module, device: torch.device) -> Iterator[None]:
    """Swaps the EMA weights into `unet` in eval mode; the training weights, mode and RNG streams come back after."""
    parameters = list(unet.parameters())
    ema.store(parameters)
    ema.copy_to(parameters)
    unet.eval()
    devices = [device.index or 0] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        unet.train()
        ema.restore(parameters)


def make_pipeline(unet: UNet2DModel, scheduler: DDPMScheduler) -> DDPMPipeline:
    pipeline = DDPMPipeline(unet=unet, scheduler=scheduler)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def write_sample_grid(pipeline: DDPMPipeline, config: TrainingConfig, path: Path) -> None:
    generator = torch.Generator().manual_seed(config.seed)
    images = pipeline(
        batch_size=config.num_sample_images,
        generator=generator,
        num_inference_steps=config.sample_inference_steps,
        output_type="np",
    ).images
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2)
    scale = math.ceil(GRID_MIN_CELL_PIXELS / pixels.shape[-1])
    if scale > 1:
        pixels = F.interpolate(pixels, scale_factor=scale, mode="nearest")
    grid = torchvision.utils.make_grid(
        pixels, nrow=math.ceil(math.sqrt(len(pixels))), padding=2, pad_value=1.0
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    staged = path.with_name(f".{path.name}")
    torchvision.utils.save_image(grid, staged, format="png")
    staged.replace(path)


def make_evaluator(config: TrainingConfig, accelerator: Accelerator) -> PipelineEvaluator:
    """The metric of `--eval_every`, e.g. FD (classifier features): the same code as `dia-diffusion fid`.

    Its feature extractor and reference statistics are built here, so an unusable metric (a dataset without
    labels for the classifier, missing Inception weights) stops the run before training, not after it.
    """
    try:
        evaluator = PipelineEvaluator(
            dataset=config.dataset,
            feature=config.eval_feature,
            num_samples=config.eval_num_samples,
            num_inference_steps=config.eval_inference_steps,
            seed=config.seed,
            image_column=config.image_column,
            accelerator=accelerator,
        )
        evaluator.prepare(config.resolution, config.channels, accelerator.device)
    # Its argument checks, and a dataset the classifier cannot learn from, raise ValueErrors.
    except (ValueError, MissingWeightsError) as error:
        raise TrainingConfigError(
            f"--eval_feature {config.eval_feature} cannot be evaluated: {error}"
        ) from None
    return evaluator


def tracker_hyperparameters(config: TrainingConfig) -> dict[str, Any]:
    """TensorBoard's hparams accept only scalars and strings."""
    return {key: value for key, value in asdict(config).items() if isinstance(value, (int, float, str, bool))}


class LogWindow:
    """Mean loss and training throughput since the last metrics row (sampling, evaluation and checkpoint time
    excluded)."""

    def __init__(self, images_per_step: int) -> None:
        self.images_per_step = images_per_step
        self.reset()

    def reset(self) -> None:
        self.loss_sum, self.batches, self.steps, self.seconds = 0.0, 0, 0, 0.0

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
        path.parent.mkdir(parents=True, exist_ok=True)
        staged = path.with_name(f".{path.name}")
        staged.write_text("".join(kept))
        staged.replace(path)
        self.file = path.open("a")

    def write(self, step: int, values: dict[str, float]) -> None:
        self.file.write(json.dumps({"step": step, **values}) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()
