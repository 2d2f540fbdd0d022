"""Text-to-image fine-tuning as a task of the one training loop: a pretrained Stable Diffusion's UNet, retrofitted
with DIA (identity gate: step 0 computes what the checkpoint computes), learns to denoise the VAE latents of the
captioned images given the text encoder's output, as Stable Diffusion was trained (Rombach et al. 2022). The VAE and
the text encoder stay frozen.

Every random draw of a step comes from the checkpointed global stream (the latent sample, the dropped captions, then
the loss's noise and timesteps), or, for crops and flips, from (seed, epoch, index) (`data/captioned_images.py`), so
a resumed run continues bitwise. With `--cache_latents` the VAE's latent distribution (its mean and log-variance, not
one sample of it) and the text encoder's output are computed once: each step still draws its own latent sample.
"""

import copy

import datasets
import torch
from accelerate import Accelerator
from diffusers import DDPMScheduler, StableDiffusionPipeline
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from dia_diffusion.data.captioned_images import CaptionedImages, EncodedItems
from dia_diffusion.models.dia_model import DIAModelMixin
from dia_diffusion.models.unet_2d_condition_dia import DIAUNet2DConditionModel
from dia_diffusion.training.config import TrainingConfig, TrainingConfigError
from dia_diffusion.training.presets import UNET_VARIANTS
from dia_diffusion.training.tasks import UnconditionalTask

WEIGHT_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# Without --validation_prompts the grid shows the captions of the first images of the dataset.
DEFAULT_PROMPT_COUNT = 4
# Images encoded per batch by --cache_latents.
CACHE_BATCH_SIZE = 8


class TextToImageTask(UnconditionalTask):
    name = "text-to-image"

    def __init__(
        self, config: TrainingConfig, source: StableDiffusionPipeline, dataset: datasets.Dataset
    ) -> None:
        super().__init__(config)
        self.source_unet = source.unet
        # Saved with the trained UNet: the source's own components, in their own precision.
        self.components = {name: value for name, value in source.components.items() if name != "unet"}
        self.requires_safety_checker = source.config.get("requires_safety_checker", False)
        self.vae, self.text_encoder, self.tokenizer = source.vae, source.text_encoder, source.tokenizer
        # Frozen: no weight of theirs asks for a gradient, so autograd records nothing through them.
        for frozen in (self.vae, self.text_encoder):
            frozen.requires_grad_(False).eval()
        self.weight_dtype = WEIGHT_DTYPES[config.mixed_precision]
        self.prompts = config.validation_prompts or first_captions(dataset, DEFAULT_PROMPT_COUNT)
        check_resolution(config.resolution, source)

    def place(self, accelerator: Accelerator) -> None:
        """The frozen encoders to the training device, in the training precision (copies, when that is not fp32:
        the saved pipeline keeps the source's weights)."""
        for name in ("vae", "text_encoder"):
            module = getattr(self, name)
            if self.weight_dtype != torch.float32:
                module = copy.deepcopy(module).to(dtype=self.weight_dtype)
            setattr(self, name, module.to(accelerator.device))
        self.device = accelerator.device
        self.show_progress = accelerator.is_main_process
        self.empty_ids = self.tokenize("").to(self.device)
        self.empty_states = self.encode_text(self.empty_ids[None])

    def initial_unet(self) -> torch.nn.Module:
        attention = UNET_VARIANTS[self.config.unet]
        if attention is None or isinstance(self.source_unet, DIAModelMixin):
            return self.source_unet.train()
        retrofit = DIAUNet2DConditionModel.from_unet(
            self.source_unet, dia_attention=attention, **self.config.dia_options()
        )
        self.source_unet = None  # one UNet in memory, not two
        return retrofit.train()

    def noise_scheduler(self) -> DDPMScheduler:
        # The pretrained schedule; resolve_config recorded its timesteps, betas and prediction type.
        return DDPMScheduler.from_config(self.components["scheduler"].config)

    def tokenize(self, caption: str) -> torch.Tensor:
        return self.tokenizer(
            caption,
            max_length=self.tokenizer.model_max_length,
            padding="max_length",
            truncation=True,
            return_tensors="pt",
        ).input_ids[0]

    def encode_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.text_encoder(input_ids.to(self.device), return_dict=False)[0]

    def training_items(self, dataset: datasets.Dataset) -> Dataset:
        config = self.config
        images = CaptionedImages(
            dataset, config.resolution, self.tokenize, config.seed, config.center_crop, config.random_flip
        )
        return self.encoded(images) if config.cache_latents else images

    def encoded(self, images: CaptionedImages) -> EncodedItems:
        """Every image's latent distribution and every caption's encoding, once (center crop, no flip: checked)."""
        if any(isinstance(text, list) for text in images.dataset["text"]):
            raise TrainingConfigError(
                "--cache_latents needs one caption per image; this dataset has lists of them"
            )
        latent_parameters, states = [], []
        batches = DataLoader(images, batch_size=CACHE_BATCH_SIZE)
        for batch in tqdm(batches, desc="caching latents", disable=not self.show_progress):
            pixels = batch["pixel_values"].to(self.device, self.weight_dtype)
            latent_parameters.append(self.vae.encode(pixels).latent_dist.parameters.cpu())
            states.append(self.encode_text(batch["input_ids"]).cpu())
        return EncodedItems(
            latent_parameters=torch.cat(latent_parameters), encoder_hidden_states=torch.cat(states)
        )

    def clean_samples(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """A sample of each image's latent distribution, scaled to unit variance as Stable Diffusion trains."""
        if "latent_parameters" in batch:
            distribution = DiagonalGaussianDistribution(batch["latent_parameters"].to(self.weight_dtype))
        else:
            distribution = self.vae.encode(batch["pixel_values"].to(self.weight_dtype)).latent_dist
        # Contiguous: the VAE may return channels-last latents, and the loss's noise (`randn_like`) follows their
        # layout; cached and encoded-per-step latents then get the same noise.
        return (distribution.sample() * self.vae.config.scaling_factor).float().contiguous()

    def unet_inputs(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The captions' encoding, with each caption dropped to "" with probability `caption_dropout`, so that the
        model keeps the unconditional prediction that classifier-free guidance needs."""
        cached = "encoder_hidden_states" in batch
        count = len(batch["encoder_hidden_states" if cached else "input_ids"])
        dropped = torch.rand(count, device=self.device) < self.config.caption_dropout
        if cached:
            states = torch.where(dropped[:, None, None], self.empty_states, batch["encoder_hidden_states"])
        else:
            states = self.encode_text(torch.where(dropped[:, None], self.empty_ids, batch["input_ids"]))
        return {"encoder_hidden_states": states.float()}

    def pipeline(self, unet: torch.nn.Module) -> StableDiffusionPipeline:
        """The validation pipeline: the training-device encoders, no safety checker (as diffusers' example)."""
        pipeline = StableDiffusionPipeline(
            **{
                **self.components,
                "vae": self.vae,
                "text_encoder": self.text_encoder,
                "unet": unet,
                "safety_checker": None,
                "feature_extractor": None,
            },
            requires_safety_checker=False,
        )
        pipeline.set_progress_bar_config(disable=True)
        return pipeline

    def published_pipeline(self, unet: torch.nn.Module) -> StableDiffusionPipeline:
        """The source pipeline, every component as it came (safety checker included), with the trained UNet."""
        return StableDiffusionPipeline(
            **{**self.components, "unet": unet}, requires_safety_checker=self.requires_safety_checker
        )

    def sample(self, pipeline: StableDiffusionPipeline, count: int, generator: torch.Generator, steps: int):
        """`count` images of each validation prompt, one prompt per row, at the training resolution."""
        with torch.autocast(self.device.type, self.weight_dtype, enabled=self.weight_dtype != torch.float32):
            return pipeline(
                list(self.prompts),
                num_images_per_prompt=count,
                height=self.config.resolution,
                width=self.config.resolution,
                guidance_scale=self.config.guidance_scale,
                generator=generator,
                num_inference_steps=steps,
                output_type="np",
            ).images

    def grid_columns(self, count: int) -> int:
        return self.config.num_sample_images


def first_captions(dataset: datasets.Dataset, count: int) -> tuple[str, ...]:
    """The first caption of each of the first `count` images."""
    texts = dataset.select(range(min(count, len(dataset))))["text"]
    return tuple(text if isinstance(text, str) else (text or [""])[0] for text in texts)


def check_resolution(resolution: int, source: StableDiffusionPipeline) -> None:
    """The VAE divides the resolution by its scale factor and each UNet level but the last halves the latents."""
    vae_factor = 2 ** (len(source.vae.config.block_out_channels) - 1)
    divisor = vae_factor * 2 ** (len(source.unet.config.block_out_channels) - 1)
    if resolution % divisor:
        raise TrainingConfigError(
            f"--resolution {resolution} cannot be divided by {divisor}, which this pipeline's VAE (x{vae_factor}) "
            f"and UNet need; use a multiple of {divisor}"
        )
