"""One DDPM training run: a resolved `TrainingConfig` in, a diffusers `DDPMPipeline` folder out.

`training_config.resolve_config` turns a preset plus flags into the config; `train` runs it under accelerate:
1. accelerator  2. inputs checked (nothing is written before they pass)  3. model, EMA, optimizer, data
4. resume  5. the loop  6. the final EMA pipeline.

Exactness on resume rests on three choices: the data order is a pure function of (seed, epoch); every random draw
of the loop (flips, noise, timesteps, dropout) comes from the global RNGs that accelerate checkpoints per process;
and sampling/evaluation run inside `torch.random.fork_rng`, so they never shift those streams.
"""

import json
import math
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from accelerate import Accelerator
from accelerate.scheduler import AcceleratedScheduler
from accelerate.utils import GradientAccumulationPlugin, ProjectConfiguration, set_seed
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from torch.utils.data import DataLoader, Sampler
from tqdm.auto import tqdm

from dia_diffusion.checkpointing import (
    CHECKPOINTS_DIRNAME,
    check_output_dir,
    check_resume_checkpoint,
    checkpoint_step,
    claim_output_dir,
    find_latest_checkpoint,
    load_resume_checkpoint,
    publish_pipeline,
    read_run_record,
    save_checkpoint,
    write_run_record,
)
from dia_diffusion.data import load_image_dataset
from dia_diffusion.decoded_images import training_pixels
from dia_diffusion.evaluation import PipelineEvaluator
from dia_diffusion.feature_extractors import MissingWeightsError
from dia_diffusion.initial_weights import load_initial_unet
from dia_diffusion.objective import prediction_target
from dia_diffusion.presets import build_unet
from dia_diffusion.training_config import RUN_NEUTRAL_FIELDS, TrainingConfig, TrainingConfigError, run_record

TRACKER_PROJECT = "train_ddpm"
METRICS_FILENAME = "metrics.jsonl"
SAMPLES_DIRNAME = "samples"
# diffusers' EMAModel warmup: decay = 1 - (1 + step)^-power, capped at ema_decay; 3/4 suits runs of ~10k steps.
EMA_WARMUP_POWER = 0.75
# Sample grids are upscaled (nearest) so that every image is at least this many pixels wide.
GRID_MIN_CELL_PIXELS = 64


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the message names the step and the last good checkpoint."""


@dataclass
class TrainingResult:
    global_step: int
    unet: UNet2DModel  # the trained (non-EMA) weights
    ema: EMAModel


def make_accelerator(config: TrainingConfig) -> Accelerator:
    """The config, not the launcher's environment, decides precision and compilation.

    A precision the device does not run is refused: given fp16 on a CPU, accelerate trains in fp32 without a word,
    and the run record would claim fp16. (bf16 on a CPU does run, under torch.autocast.)
    """
    output_dir = Path(config.output_dir)
    try:
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
    except ValueError as error:  # accelerate's refusal of a precision the device lacks
        if config.mixed_precision == "no":
            raise
        raise TrainingConfigError(f"--mixed_precision {config.mixed_precision}: {error}") from None
    if config.mixed_precision != "no" and not accelerator.native_amp:
        raise TrainingConfigError(
            f"--mixed_precision {config.mixed_precision} does not run on {accelerator.device.type}: accelerate "
            "would train in fp32; use --mixed_precision no (or bf16)"
        )
    return accelerator


def train(config: TrainingConfig) -> TrainingResult:
    """Runs (or resumes) the training described by `config`; every process of an accelerate launch calls it."""
    output_dir = Path(config.output_dir)
    checkpoints_dir = output_dir / CHECKPOINTS_DIRNAME

    # 1. Accelerator.
    accelerator = make_accelerator(config)
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
    unet = initial_unet(config)
    record = run_record(config, accelerator.num_processes)
    resuming = config.resume_from_checkpoint is not None
    if resuming:
        check_resume_checkpoint(checkpoints_dir, config.resume_from_checkpoint, record, RUN_NEUTRAL_FIELDS)
    check_output_dir(output_dir, record, RUN_NEUTRAL_FIELDS, resuming)
    evaluator = make_evaluator(config, accelerator) if config.eval_every else None
    accelerator.wait_for_everyone()

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

    # 4. The folder becomes this run's (a second training into it is refused until this one ends), then resume.
    folder_lock = (
        claim_output_dir(output_dir, record, RUN_NEUTRAL_FIELDS, resuming)
        if accelerator.is_main_process
        else None
    )
    progress = metrics = None
    try:
        global_step, record = resume(accelerator, config, checkpoints_dir, lr_scheduler, ema, record)
        if accelerator.is_main_process:
            write_run_record(output_dir, record)
        accelerator.print(run_summary(config, accelerator.num_processes, len(dataset), unet))

        # 5. The loop.
        if accelerator.is_main_process:
            metrics = MetricsLog(output_dir / METRICS_FILENAME, keep_until_step=global_step)
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
        keep_checkpoints = config.checkpoints_total_limit or None
        epoch, batches_to_skip = divmod(
            global_step * config.gradient_accumulation_steps, len(train_dataloader)
        )
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
                    check_finite(losses, global_step + 1, checkpoints_dir)
                log_window.add_batch(losses.mean().item())
                if not accelerator.sync_gradients:
                    continue
                learning_rate = optimizer.param_groups[0]["lr"]  # what this step used
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
                # After the step's metrics: a checkpoint never lacks a row that the resumed run would not log again.
                if global_step % config.checkpointing_steps == 0 or is_last:
                    save_checkpoint(accelerator, checkpoints_dir, global_step, keep_checkpoints, record)
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
        if progress is not None:
            progress.close()
        if metrics is not None:
            metrics.close()
        accelerator.end_training()
        if folder_lock is not None:
            folder_lock.release()
    return TrainingResult(global_step=global_step, unet=accelerator.unwrap_model(unet), ema=ema)


def run_summary(config: TrainingConfig, num_processes: int, num_images: int, unet: torch.nn.Module) -> str:
    images_per_step = config.train_batch_size * num_processes * config.gradient_accumulation_steps
    return (
        f"effective batch size {images_per_step} = {config.train_batch_size} per process x {num_processes} "
        f"processes x {config.gradient_accumulation_steps} accumulation steps; {num_images} images; "
        f"{sum(p.numel() for p in unet.parameters()):,} parameters ({config.unet} UNet)"
    )


def resume(
    accelerator: Accelerator,
    config: TrainingConfig,
    checkpoints_dir: Path,
    lr_scheduler: AcceleratedScheduler,
    ema: EMAModel,
    record: dict[str, Any],
) -> tuple[int, dict[str, Any]]:
    """Loads what --resume_from_checkpoint names (weights, optimizer, LR schedule, EMA, every process's RNG states)
    and continues at --learning_rate; returns the step to continue from and the run record, with the learning-rate
    history as of that step."""
    if config.resume_from_checkpoint is None:
        return 0, record
    spec = config.resume_from_checkpoint
    path = load_resume_checkpoint(
        accelerator, checkpoints_dir, spec, lambda message: warn(accelerator, message)
    )
    if path is None:
        return 0, record
    global_step = checkpoint_step(path)
    if global_step > config.max_train_steps:
        # Nothing would train, and the final pipeline would publish this later step's weights as a shorter run's.
        raise TrainingConfigError(
            f"--resume_from_checkpoint: {path.name} is at step {global_step}, past --max_train_steps "
            f"{config.max_train_steps}; raise --max_train_steps or train into a new --output_dir"
        )
    # accelerate loads registered objects onto the CPU.
    ema.to(accelerator.device)
    accelerator.print(f"resumed from {path} at step {global_step}")
    changes = continue_learning_rate(lr_scheduler, config.learning_rate, global_step, read_run_record(path))
    if len(changes) > 1 and changes[-1]["step"] == global_step:
        accelerator.print(
            f"learning rate {changes[-2]['learning_rate']:g} -> {config.learning_rate:g} from step {global_step + 1}"
        )
    return global_step, {**record, "learning_rate_changes": changes}


def continue_learning_rate(
    lr_scheduler: AcceleratedScheduler,
    learning_rate: float,
    step: int,
    checkpoint_record: dict[str, Any] | None,
) -> list[dict[str, Any]]:
    """Sets the loaded schedule's base rate to `learning_rate` and returns the run's learning-rate changes.

    A loaded checkpoint brings back the learning rate it was trained with; a lower one on resume is the way out of
    a NaN loss, so the schedule continues from its position with the new base rate (every diffusers schedule is a
    torch LambdaLR: lr = base rate x factor(step)). The changes so far come from the checkpoint's run record (a
    checkpoint without one ran at its restored rate from the start).
    """
    schedule = lr_scheduler.scheduler  # the torch scheduler inside accelerate's wrapper
    restored = schedule.base_lrs[0]
    initial = [{"step": 0, "learning_rate": restored}]
    changes = (checkpoint_record or {}).get("learning_rate_changes") or initial
    if learning_rate == restored:
        return changes
    schedule.base_lrs = [learning_rate] * len(schedule.base_lrs)
    for group, factor in zip(schedule.optimizer.param_groups, schedule.lr_lambdas, strict=True):
        group["initial_lr"] = learning_rate
        group["lr"] = learning_rate * factor(schedule.last_epoch)
    return [*changes, {"step": step, "learning_rate": learning_rate}]


def warn(accelerator: Accelerator, message: str) -> None:
    """One line on stderr, from the main process only."""
    if accelerator.is_main_process:
        print(f"warning: {message}", file=sys.stderr)


def initial_unet(config: TrainingConfig) -> UNet2DModel:
    """The model the run starts from: a fresh one of the preset's layout, or the saved UNet of `--init_unet`."""
    if config.init_unet is not None:
        return load_initial_unet(config)
    try:
        return build_unet(config.unet, config.unet_arguments(), config.dia_options())
    except ValueError as error:
        raise TrainingConfigError(
            f"the UNet of --preset {config.preset} with these flags cannot be built: {error}"
        ) from None


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


def check_finite(losses: torch.Tensor, step: int, checkpoints_dir: Path) -> None:
    """Raises NonFiniteLossError, naming the step and the last good checkpoint, when any process's loss is not
    finite."""
    if not torch.isfinite(losses).all():
        raise NonFiniteLossError(
            f"the loss became {losses[~torch.isfinite(losses)][0].item()} at step {step}; "
            "training stopped before that step's update "
            f"(last good checkpoint: {find_latest_checkpoint(checkpoints_dir) or 'none'})"
        )


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
    target = prediction_target(noise_scheduler, clean_images, noise, timesteps)
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
