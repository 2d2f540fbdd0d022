"""The Stable Diffusion pipeline folder and the captioned image folder that benchmarks/text_to_image_throughput.py
trains on, built offline from seed 0: the SD 1.x components (VAE, CLIP text encoder and tokenizer, UNet2DConditionModel
with cross-attention, DDPM schedule), small, and images with a metadata.jsonl, as both trainers load them."""

import json
import shutil
from pathlib import Path

import datasets
import torch
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from trainer_throughput import build_dataset_cache, make_image_folder
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

# Lower-case letters and spaces only: the vocabulary below spells every caption letter by letter.
CAPTIONS = ("a red square", "a blue circle on green", "two yellow stripes", "a dark field at night")
LETTERS = "abcdefghijklmnopqrstuvwxyz"
# CLIP's byte-pair format without merges: each letter alone, and as the end of a word. CLIP's tokenizer maps an
# unknown token to its end-of-text token, which is also its padding.
VOCABULARY = ["<|startoftext|>", "<|endoftext|>", *LETTERS, *(f"{letter}</w>" for letter in LETTERS)]
MAX_TOKENS = 77  # Stable Diffusion's caption length; both trainers pad every caption to it
# SD 1.x's components, small. The UNet follows the layout of diffusers' own SD pipeline tests (cross-attention on the
# second level), wider; `medium` has three levels with cross-attention on the first two, as SD 1.x has on three of
# four, for a GPU.
LAYOUTS = {
    "small": dict(
        unet=dict(
            block_out_channels=(32, 64),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=8,
        ),
        vae_channels=(16, 32),
        text_width=32,
    ),
    "medium": dict(
        unet=dict(
            block_out_channels=(64, 128, 256),
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            attention_head_dim=8,
        ),
        vae_channels=(32, 64, 64),
        text_width=64,
    ),
}


def build_pipeline(folder: Path, layout: str, resolution: int) -> Path:
    """An SD 1.x pipeline folder of the layout, built from seed 0: what both trainers load."""
    sizes = LAYOUTS[layout]
    torch.manual_seed(0)
    vae_levels = len(sizes["vae_channels"])
    vae = AutoencoderKL(
        block_out_channels=sizes["vae_channels"],
        down_block_types=["DownEncoderBlock2D"] * vae_levels,
        up_block_types=["UpDecoderBlock2D"] * vae_levels,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=resolution,
    )
    unet = UNet2DConditionModel(
        **sizes["unet"],
        sample_size=resolution // 2 ** (vae_levels - 1),
        in_channels=4,
        out_channels=4,
        layers_per_block=2,
        cross_attention_dim=sizes["text_width"],
    )
    width = sizes["text_width"]
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(VOCABULARY),
            hidden_size=width,
            intermediate_size=2 * width,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=MAX_TOKENS,
            bos_token_id=VOCABULARY.index("<|startoftext|>"),
            eos_token_id=VOCABULARY.index("<|endoftext|>"),
            pad_token_id=VOCABULARY.index("<|endoftext|>"),
        )
    )
    pipeline = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=letter_tokenizer(folder / "tokenizer-source"),
        unet=unet,
        scheduler=DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.save_pretrained(folder / "pipeline")
    shutil.rmtree(folder / "tokenizer-source")
    return folder / "pipeline"


def letter_tokenizer(folder: Path) -> CLIPTokenizer:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({token: index for index, token in enumerate(VOCABULARY)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=MAX_TOKENS)


def make_captioned_folder(folder: Path, count: int, resolution: int) -> None:
    """`count` images at the training resolution and a metadata.jsonl that gives each one of CAPTIONS in turn."""
    make_image_folder(folder, count, resolution)
    rows = [
        json.dumps({"file_name": image.name, "text": CAPTIONS[index % len(CAPTIONS)]})
        for index, image in enumerate(sorted(folder.glob("*.png")))
    ]
    (folder / "metadata.jsonl").write_text("\n".join(rows) + "\n")


def build_dataset_caches(images: Path, cache: Path) -> None:
    """The arrow cache of the folder as ours loads it (`data_dir`) and as the example does (`data_files`)."""
    build_dataset_cache(images, cache)
    datasets.load_dataset("imagefolder", data_files={"train": str(images / "**")}, cache_dir=str(cache))
