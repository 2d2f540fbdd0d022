"""`dia-diffusion analyze-correlation`: how alike are the channel attentions of different layers?

DIA rests on one observation (DIA paper, Sec. 1): attention modules placed independently in every layer produce
strongly correlated attention maps, with an average Pearson correlation of up to 0.85. This tool measures that on a
trained UNet: it noises real images at several timesteps, records every resnet's channel-attention vector, and
computes the Pearson correlation (across channels, for the same input) between every pair of layers of equal width,
averaged over images and timesteps. Layers of different widths have no correlation and are left blank.

It also reports how much each layer's attention depends on its input: the standard deviation of every channel's
attention across the recorded inputs (images x timesteps), averaged over channels. Near zero, the attention is a
fixed per-channel scale, which the following convolution could have learnt by itself; the recalibration the paper
credits for DIA's gains needs attention that changes with the input.
"""

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from diffusers import DDPMScheduler

from dia_diffusion.data import load_image_dataset, to_uint8_images
from dia_diffusion.errors import first_line
from dia_diffusion.output_files import check_output_path, write_atomically
from dia_diffusion.unet_dia import DIAUNet2DModel


@torch.no_grad()
def record_attention(
    unet: DIAUNet2DModel, images: torch.Tensor, timesteps: list[int], scheduler: DDPMScheduler, seed: int = 0
) -> list[torch.Tensor]:
    """Every site's attention vectors: a list (one per resnet) of [len(timesteps) * N, C_site] float tensors."""
    attention_module = unet.channel_attention
    if attention_module is None:
        raise ValueError("the model has no channel attention to analyse (dia_attention='none')")
    records: list[list[torch.Tensor]] = [[] for _ in unet.resnet_sites]
    compute_attention = attention_module.attention

    def recording(branch, site, state):
        attention, state = compute_attention(branch, site, state)
        records[site].append(attention.float().cpu())
        return attention, state

    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(images.shape, generator=generator).to(images.device)
    attention_module.attention = recording  # an instance attribute shadows the method for this analysis only
    try:
        for timestep in timesteps:
            t = torch.full((images.shape[0],), timestep, dtype=torch.long, device=images.device)
            unet(scheduler.add_noise(images, noise, t), t)
    finally:
        del attention_module.attention
    return [torch.cat(site_records) for site_records in records]


def layer_correlation(vectors: list[torch.Tensor]) -> np.ndarray:
    """[L, L] mean Pearson correlation between layers' attention vectors for the same input; NaN across widths."""
    normalised = []
    for site_vectors in vectors:
        centred = site_vectors.double() - site_vectors.double().mean(dim=1, keepdim=True)
        normalised.append(centred / centred.norm(dim=1, keepdim=True).clamp_min(1e-12))
    size = len(vectors)
    matrix = np.full((size, size), np.nan)
    for i in range(size):
        for j in range(size):
            if normalised[i].shape == normalised[j].shape:
                matrix[i, j] = (normalised[i] * normalised[j]).sum(dim=1).mean().item()
    return matrix


def input_variation(vectors: list[torch.Tensor]) -> list[float]:
    """Per layer: each channel's attention std across inputs, averaged over channels."""
    return [site_vectors.double().std(dim=0).mean().item() for site_vectors in vectors]


def mean_off_diagonal(matrix: np.ndarray) -> float:
    off_diagonal = matrix[~np.eye(len(matrix), dtype=bool)]
    return float(np.nanmean(off_diagonal))


def draw_heatmap(matrix: np.ndarray, site_widths: list[int], title: str, path: Path) -> None:
    """The matrix as a PNG; `path` may lack the extension (the format is given)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6.5, 5.5))
    image = axes.imshow(np.ma.masked_invalid(matrix), vmin=-1, vmax=1, cmap="RdBu_r")
    labels = [f"{index}:{width}" for index, width in enumerate(site_widths)]
    axes.set_xticks(range(len(labels)), labels, rotation=90, fontsize=6)
    axes.set_yticks(range(len(labels)), labels, fontsize=6)
    axes.set_xlabel("resnet (forward order : width)")
    axes.set_title(title, fontsize=9)
    figure.colorbar(image, ax=axes, label="Pearson r")
    figure.tight_layout()
    figure.savefig(path, dpi=150, format="png")
    plt.close(figure)


def load_unet_and_scheduler(model_dir: Path) -> tuple[DIAUNet2DModel, DDPMScheduler]:
    """A pipeline folder (unet/ + scheduler/) or a bare model folder, holding a trained DIAUNet2DModel."""
    if (model_dir / "unet" / "config.json").is_file():
        subfolder = "unet"
    elif (model_dir / "config.json").is_file():
        subfolder = None
    else:
        raise ValueError(f"--model: no pipeline or model folder at {model_dir}")
    try:
        class_name = DIAUNet2DModel.load_config(model_dir, subfolder=subfolder).get("_class_name")
        # DIAUNet2DModel.from_pretrained would retrofit a stock UNet with fresh, untrained attention.
        if class_name != DIAUNet2DModel.__name__:
            raise ValueError(
                f"--model: {model_dir} holds a {class_name}, whose channel attention was never trained; "
                "give a model trained with DIA"
            )
        unet = DIAUNet2DModel.from_pretrained(model_dir, subfolder=subfolder)
        scheduler = (
            DDPMScheduler.from_pretrained(model_dir, subfolder="scheduler") if subfolder else DDPMScheduler()
        )
    except OSError as error:
        raise ValueError(f"--model: {model_dir} cannot be loaded: {first_line(error)}") from None
    return unet.eval(), scheduler


def analyze(args: argparse.Namespace) -> dict:
    if args.num_images < 1:
        raise ValueError(f"--num_images must be positive, got {args.num_images}")
    unet, scheduler = load_unet_and_scheduler(Path(args.model))
    steps = scheduler.config.num_train_timesteps
    outside = [timestep for timestep in args.timesteps if not 0 <= timestep < steps]
    if outside:
        raise ValueError(
            f"--timesteps {' '.join(map(str, outside))}: the model was trained on timesteps 0 to {steps - 1}"
        )
    resolution, channels = unet.config.sample_size, unet.config.in_channels
    dataset = load_image_dataset(args.dataset, split=args.split)
    count = min(args.num_images, len(dataset))
    pixels = to_uint8_images(dataset.select(range(count))["image"], resolution, channels).float() / 127.5 - 1
    vectors = record_attention(unet, pixels, args.timesteps, scheduler, seed=args.seed)
    matrix = layer_correlation(vectors)
    widths = [site.channels for site in unet.resnet_sites]
    per_width = {}
    for width in sorted(set(widths)):
        members = [index for index, w in enumerate(widths) if w == width]
        if len(members) > 1:
            per_width[str(width)] = mean_off_diagonal(matrix[np.ix_(members, members)])
    return {
        "model": str(args.model),
        "dia_attention": unet.config.dia_attention,
        "dia_sharing": unet.config.dia_sharing,
        "dataset": args.dataset,
        "split": args.split,
        "num_images": count,
        "timesteps": list(args.timesteps),
        "seed": args.seed,
        "site_widths": widths,
        "mean_off_diagonal": mean_off_diagonal(matrix),
        "mean_off_diagonal_per_width": per_width,
        "input_variation": [round(value, 5) for value in input_variation(vectors)],
        "correlation": [[None if np.isnan(value) else round(value, 5) for value in row] for row in matrix],
    }


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "analyze-correlation",
        help="Pearson correlation of channel attention between layers of a trained UNet",
    )
    parser.add_argument(
        "--model", required=True, help="a trained pipeline folder (or a DIAUNet2DModel folder)"
    )
    parser.add_argument(
        "--dataset", required=True, help="real images to run through the model (a dataset spec)"
    )
    parser.add_argument("--split", default="test")
    parser.add_argument("--num_images", type=int, default=256)
    parser.add_argument("--timesteps", type=int, nargs="+", default=[50, 250, 500, 750])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out_dir", default=None, help="where to write correlation.json and correlation.png")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    out_dir = Path(args.out_dir or args.model)
    check_output_path(out_dir, "--out_dir", folder=True)
    report = analyze(args)
    write_atomically(
        out_dir / "correlation.json", lambda partial: partial.write_text(json.dumps(report, indent=1))
    )
    sharing = "" if report["dia_attention"] == "se_per_layer" else f" ({report['dia_sharing']})"
    title = (
        f"{report['dia_attention']}{sharing}: mean off-diagonal r = {report['mean_off_diagonal']:.3f}\n"
        f"{report['num_images']} {report['dataset']} images x timesteps {report['timesteps']}"
    )
    matrix = np.array(
        [[np.nan if value is None else value for value in row] for row in report["correlation"]]
    )
    write_atomically(
        out_dir / "correlation.png",
        lambda partial: draw_heatmap(matrix, report["site_widths"], title, partial),
    )
    print(
        f"mean off-diagonal Pearson r = {report['mean_off_diagonal']:.4f}  (per width: {report['mean_off_diagonal_per_width']})"
    )
    variation = report["input_variation"]
    print(
        f"attention std across inputs, mean over channels: {min(variation):.4f} to {max(variation):.4f} per layer "
        f"(mean {sum(variation) / len(variation):.4f})"
    )
    print(f"wrote {out_dir / 'correlation.json'} and {out_dir / 'correlation.png'}")
    return 0
