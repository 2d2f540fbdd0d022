"""Tiny Stable Diffusion, SDXL and ControlNet components built offline (no hub): the layouts of diffusers' own pipeline
tests, small enough that a whole pipeline call takes well under a second on a CPU."""

import json
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    ControlNetModel,
    DDIMScheduler,
    EulerDiscreteScheduler,
    StableDiffusionControlNetPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

# A byte-pair vocabulary of 23 tokens, enough for prompts spelled from "lower", "newer", "wider" and "lowest".
VOCABULARY = [
    "l", "o", "w", "e", "r", "s", "t", "i", "d", "n", "lo", "l</w>", "w</w>", "r</w>", "t</w>", "low</w>", "er</w>",
    "lowest</w>", "newer</w>", "wider", "<unk>", "<|startoftext|>", "<|endoftext|>",
]  # fmt: skip
MERGES = ["#version: 0.2", "l o", "lo w</w>", "e r</w>"]
PROMPT = "lower newer"

SD_UNET = dict(
    block_out_channels=(4, 8),
    layers_per_block=1,
    sample_size=32,
    in_channels=4,
    out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=8,
    norm_num_groups=2,
)
SDXL_UNET = dict(
    block_out_channels=(2, 4),
    layers_per_block=2,
    sample_size=32,
    in_channels=4,
    out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=(2, 4),
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=8,
    transformer_layers_per_block=(1, 2),
    projection_class_embeddings_input_dim=80,  # 5 time ids x 8 + the pooled text embedding's 32 + 8
    cross_attention_dim=64,
    norm_num_groups=1,
)


def tokenizer(folder: Path) -> CLIPTokenizer:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({token: index for index, token in enumerate(VOCABULARY)}))
    (folder / "merges.txt").write_text("\n".join(MERGES) + "\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)


def vae() -> AutoencoderKL:
    return AutoencoderKL(
        block_out_channels=[4, 8],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2,
        latent_channels=4,
        norm_num_groups=2,
    )


def text_config(**overrides) -> CLIPTextConfig:
    settings = dict(
        bos_token_id=0,
        eos_token_id=2,
        hidden_size=8,
        intermediate_size=16,
        layer_norm_eps=1e-05,
        num_attention_heads=2,
        num_hidden_layers=2,
        pad_token_id=1,
        vocab_size=1000,
    )
    settings.update(overrides)
    return CLIPTextConfig(**settings)


def stable_diffusion(folder: Path, unet: UNet2DConditionModel | None = None) -> StableDiffusionPipeline:
    """A tiny SD 1.x pipeline; `unet` replaces its stock UNet (of the layout `SD_UNET`)."""
    torch.manual_seed(0)
    components = dict(
        unet=UNet2DConditionModel(**SD_UNET),
        vae=vae(),
        text_encoder=CLIPTextModel(text_config()),
        tokenizer=tokenizer(folder / "tokenizer"),
        scheduler=DDIMScheduler(
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            clip_sample=False,
            set_alpha_to_one=False,
            steps_offset=1,
        ),
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        requires_safety_checker=False,
    )
    if unet is not None:
        components["unet"] = unet
    return quiet(StableDiffusionPipeline(**components))


def stable_diffusion_xl(folder: Path) -> StableDiffusionXLPipeline:
    torch.manual_seed(0)
    config = text_config(
        hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=5, hidden_act="gelu",
        projection_dim=32,
    )  # fmt: skip
    return quiet(
        StableDiffusionXLPipeline(
            unet=UNet2DConditionModel(**SDXL_UNET),
            vae=vae(),
            text_encoder=CLIPTextModel(config),
            text_encoder_2=CLIPTextModelWithProjection(config),
            tokenizer=tokenizer(folder / "tokenizer"),
            tokenizer_2=tokenizer(folder / "tokenizer_2"),
            scheduler=EulerDiscreteScheduler(
                beta_start=0.00085,
                beta_end=0.012,
                beta_schedule="scaled_linear",
                steps_offset=1,
                timestep_spacing="leading",
            ),
            image_encoder=None,
            feature_extractor=None,
        )
    )


def stable_diffusion_controlnet(folder: Path) -> StableDiffusionControlNetPipeline:
    sd = stable_diffusion(folder, unet=sd_unet_for_controlnet())
    torch.manual_seed(1)
    controlnet = ControlNetModel(
        block_out_channels=(4, 8),
        layers_per_block=1,
        in_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        cross_attention_dim=8,
        conditioning_embedding_out_channels=(16, 32),
        norm_num_groups=2,
    )
    return quiet(StableDiffusionControlNetPipeline(**sd.components, controlnet=controlnet))


def sd_unet_for_controlnet() -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(**SD_UNET)


def quiet(pipeline):
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def control_image() -> torch.Tensor:
    return torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def images(pipeline, seed: int = 0, **arguments) -> torch.Tensor:
    """Two inference steps of `pipeline` on `PROMPT`, as a tensor."""
    output = pipeline(
        PROMPT,
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(seed),
        output_type="pt",
        **arguments,
    )
    return output.images
