"""The memory a Stable Diffusion 1.5 fine-tune needs, with and without gradient checkpointing, DIA against stock.

    python benchmarks/sd_memory.py                  # the static part only (weights, gradients, AdamW, EMA): any CPU
    python benchmarks/sd_memory.py --device cuda    # also the CUDA peak of training steps, bf16 autocast

The UNet is built from SD 1.5's layout (its `unet/config.json`, written out below), with random weights: memory does
not depend on their values, and nothing is downloaded. What train/train_text_to_image.py holds besides the UNet's
training state is the frozen VAE and text encoder in the training precision (`FROZEN_PARAMETERS`, SD 1.5's counts).

Static part, exact from the parameter count: fp32 weights, fp32 gradients, AdamW's two fp32 moments and the fp32 EMA
copy, 20 bytes per parameter. On a GPU the peak of `--steps` optimizer steps (after one warm-up step) is measured as
the trainer runs them: `--batch_size` latents of 64x64 (512x512 images) with 77-token text states, bf16 autocast,
fused AdamW, the EMA step. The last line printed is one JSON object.
"""

import argparse
import json
import platform

import torch
from diffusers import UNet2DConditionModel
from diffusers.training_utils import EMAModel

from dia_diffusion import DIAUNet2DConditionModel

# runwayml/stable-diffusion-v1-5 unet/config.json (the arguments that differ from UNet2DConditionModel's defaults).
SD15_UNET = dict(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
TEXT_TOKENS, TEXT_WIDTH = 77, 768
# The frozen components of SD 1.5: the VAE (83.7 M) and the CLIP ViT-L/14 text encoder (123.1 M).
FROZEN_PARAMETERS = 83_653_863 + 123_060_480
BYTES_PER_TRAINED_PARAMETER = 4 + 4 + 8 + 4  # weights, gradients, AdamW's two moments, EMA
GIB = 2**30


def build(variant: str) -> torch.nn.Module:
    if variant == "stock":
        return UNet2DConditionModel(**SD15_UNET)
    return DIAUNet2DConditionModel(**SD15_UNET, dia_gate="identity")


def static_bytes(parameters: int, frozen_bytes_per_parameter: int = 2) -> dict[str, float]:
    """GiB of the training state (fp32) and of the frozen encoders (bf16 by default)."""
    return {
        "unet_training_state_gib": parameters * BYTES_PER_TRAINED_PARAMETER / GIB,
        "frozen_encoders_gib": FROZEN_PARAMETERS * frozen_bytes_per_parameter / GIB,
    }


def cuda_peak(unet: torch.nn.Module, checkpointing: bool, batch_size: int, steps: int) -> float:
    """GiB at the CUDA peak of `steps` training steps after a warm-up step."""
    device = torch.device("cuda")
    unet.to(device).train()
    if checkpointing:
        unet.enable_gradient_checkpointing()
    else:
        unet.disable_gradient_checkpointing()
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-5, fused=True)
    ema = EMAModel(unet.parameters(), foreach=True)
    ema.to(device)
    latents = torch.randn(batch_size, 4, 64, 64, device=device)
    states = torch.randn(batch_size, TEXT_TOKENS, TEXT_WIDTH, device=device)
    timesteps = torch.randint(0, 1000, (batch_size,), device=device)
    for step in range(steps + 1):
        if step == 1:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        with torch.autocast("cuda", torch.bfloat16):
            loss = unet(latents, timesteps, encoder_hidden_states=states).sample.float().square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ema.step(unet.parameters())
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / GIB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--batch_size", type=int, default=1)
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")
    print(f"# SD 1.5 UNet layout, {platform.node()}, torch {torch.__version__}")
    results = {}
    for variant in ("stock", "dia"):
        torch.manual_seed(0)
        unet = build(variant)
        parameters = sum(p.numel() for p in unet.parameters())
        result = {"parameters": parameters, **static_bytes(parameters)}
        if args.device == "cuda":
            for checkpointing in (False, True):
                key = f"peak_gib_batch{args.batch_size}_{'checkpointing' if checkpointing else 'no_checkpointing'}"
                result[key] = cuda_peak(unet, checkpointing, args.batch_size, args.steps)
                torch.cuda.empty_cache()
        results[variant] = result
        del unet
        print(
            variant,
            {key: round(value, 3) if isinstance(value, float) else value for key, value in result.items()},
        )
    print(json.dumps(results))


if __name__ == "__main__":
    main()
