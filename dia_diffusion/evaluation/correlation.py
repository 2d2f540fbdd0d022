"""`dia-diffusion analyze-correlation`: how alike are the channel attentions of different layers, and what do they
depend on?

DIA rests on one observation (DIA paper, Sec. 1): attention modules placed independently in every layer produce
strongly correlated attention maps, with an average Pearson correlation of up to 0.85. This tool measures that on a
trained UNet: it noises real images at several timesteps, records every resnet's channel-attention vector, and
reports three correlations:
- `mean_r_all_pairs`: the Pearson correlation (across channels, for the same input) of every pair of equal-width
  resnets, averaged over inputs and pairs;
- `mean_r_aligned_pairs`: the same, over the pairs whose branches add into the same residual stream. In the authors'
  ResNets every block of a stage adds into one stream, so channel i means the same thing in every block of the stage;
  in a UNet only the resnets of one down level (with the mid block after the last level) share a stream, and every up
  resnet re-mixes its channels through a 1x1 shortcut on the concatenated skip. Pairs outside a stream compare
  channels with unrelated meanings;
- `mean_r_profiles`: over the aligned pairs, the correlation of the two layers' dataset-mean attention profiles (one
  vector per layer, averaged over images and timesteps).

And what each layer's attention depends on: each channel's standard deviation across images at a fixed timestep
(`input_variation`) and across timesteps for a fixed image (`timestep_variation`), averaged over channels. An
attention that varies with neither is a fixed per-channel scale, which the branch's last convolution could have
learnt by itself; the recalibration the paper credits for DIA's gains needs attention that changes with its input.
"""

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from diffusers import DDPMScheduler
from diffusers.models.resnet import ResnetBlock2D

from dia_diffusion.data.image_datasets import load_image_dataset, to_uint8_images
from dia_diffusion.models.unet_2d_dia import DIAUNet2DModel
from dia_diffusion.runtime.errors import first_line
from dia_diffusion.runtime.folder_lock import lock_output
from dia_diffusion.runtime.output_files import check_output_path, write_file_set

# Enough noise levels to draw attention against the timestep, from almost clean to almost pure noise.
DEFAULT_TIMESTEPS = list(range(50, 1000, 100))
# Sites and channels drawn in the attention-vs-timestep figure: evenly spaced, so the picture is not a selection.
FIGURE_SITES = 4
FIGURE_CHANNELS = 4
# Written last, so a folder that holds it holds the figures of the same analysis.
REPORT_FILE = "correlation.json"


@torch.no_grad()
def record_attention(
    unet: DIAUNet2DModel, images: torch.Tensor, timesteps: list[int], scheduler: DDPMScheduler, seed: int = 0
) -> list[torch.Tensor]:
    """Every site's attention vectors: a list (one per resnet) of [len(timesteps), N, C_site] float tensors."""
    attention_module = unet.channel_attention
    if attention_module is None:
        raise ValueError("the model has no channel attention to analyse (dia_attention='none')")
    records: list[list[torch.Tensor]] = [[] for _ in unet.resnet_sites]
    compute_attention = attention_module.attention

    def recording(branch, site, *state_and_condition):
        attention, state = compute_attention(branch, site, *state_and_condition)
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
    return [torch.stack(site_records) for site_records in records]


def pearson(vectors: torch.Tensor) -> torch.Tensor:
    """Rows centred and scaled to unit norm, so that a dot product of two rows is their Pearson r."""
    centred = vectors.double() - vectors.double().mean(dim=-1, keepdim=True)
    return centred / centred.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def correlation_matrix(rows: list[torch.Tensor]) -> np.ndarray:
    """[L, L]: the Pearson r between two layers' rows [M, C] for the same input, averaged over the M inputs; NaN
    between layers of different widths."""
    normalised = [pearson(site_rows) for site_rows in rows]
    size = len(rows)
    matrix = np.full((size, size), np.nan)
    for i in range(size):
        for j in range(size):
            if normalised[i].shape == normalised[j].shape:
                matrix[i, j] = (normalised[i] * normalised[j]).sum(dim=1).mean().item()
    return matrix


def layer_correlation(vectors: list[torch.Tensor]) -> np.ndarray:
    """Layer x layer Pearson r of the attention vectors for the same input, averaged over inputs."""
    return correlation_matrix([site_vectors.flatten(0, -2) for site_vectors in vectors])


def profile_correlation(vectors: list[torch.Tensor]) -> np.ndarray:
    """Layer x layer Pearson r of the mean attention profiles (averaged over images and timesteps)."""
    return correlation_matrix(
        [site_vectors.flatten(0, -2).mean(dim=0, keepdim=True) for site_vectors in vectors]
    )


def input_variation(vectors: list[torch.Tensor]) -> list[float]:
    """Per layer: each channel's attention std across images at a fixed timestep, averaged over channels and
    timesteps."""
    return [site_vectors.double().std(dim=1).mean().item() for site_vectors in vectors]


def timestep_variation(vectors: list[torch.Tensor]) -> list[float]:
    """Per layer: each channel's attention std across timesteps for a fixed image, averaged over channels and
    images."""
    return [site_vectors.double().std(dim=0).mean().item() for site_vectors in vectors]


def residual_streams(unet: DIAUNet2DModel) -> list[int]:
    """Per site, the residual stream its gated branch adds into; sites with the same id share channel meaning.

    A stream runs through resnets with an identity shortcut and through the residual attention layers between them.
    A new one starts where channels are re-mixed: at a resnet with a 1x1 `conv_shortcut` (every up resnet, whose
    input is the concatenated skip) and after a convolutional down- or upsampler between blocks.
    """
    blocks = [*unet.down_blocks, *([unet.mid_block] if unet.mid_block is not None else []), *unet.up_blocks]
    streams: list[int] = []
    previous_block = None
    for block_index, resnet in unet.resnets_in_order():
        crossed_remix = (
            previous_block is not None
            and block_index != previous_block
            and remixes_channels_after(blocks[previous_block])
        )
        if previous_block is None or resnet.conv_shortcut is not None or crossed_remix:
            streams.append(streams[-1] + 1 if streams else 0)
        else:
            streams.append(streams[-1])
        previous_block = block_index
    return streams


def remixes_channels_after(block) -> bool:
    """Whether a block ends with a down/upsampler that mixes channels (a convolution, not a resnet or a pool)."""
    samplers = getattr(block, "downsamplers", None) or getattr(block, "upsamplers", None) or []
    return any(
        not isinstance(sampler, ResnetBlock2D)
        and (sampler.use_conv or getattr(sampler, "use_conv_transpose", False))
        for sampler in samplers
    )


def aligned_pairs(streams: list[int]) -> list[tuple[int, int]]:
    return [
        (i, j) for i in range(len(streams)) for j in range(i + 1, len(streams)) if streams[i] == streams[j]
    ]


def mean_off_diagonal(matrix: np.ndarray) -> float:
    off_diagonal = matrix[~np.eye(len(matrix), dtype=bool)]
    return float(np.nanmean(off_diagonal))


def mean_over_pairs(matrix: np.ndarray, pairs: list[tuple[int, int]]) -> float | None:
    return float(np.mean([matrix[i, j] for i, j in pairs])) if pairs else None


def draw_heatmap(
    matrix: np.ndarray, site_widths: list[int], streams: list[int], title: str, path: Path
) -> None:
    """The layer x layer correlation, with a box around each group of resnets that share a residual stream."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    figure, axes = plt.subplots(figsize=(6.5, 6))
    image = axes.imshow(np.ma.masked_invalid(matrix), vmin=-1, vmax=1, cmap="RdBu_r")
    for stream in sorted(set(streams)):
        members = [index for index, s in enumerate(streams) if s == stream]
        if len(members) > 1:
            start, size = members[0] - 0.5, len(members)
            axes.add_patch(
                Rectangle((start, start), size, size, fill=False, edgecolor="black", linewidth=1.5)
            )
    labels = [f"{index}:{width}" for index, width in enumerate(site_widths)]
    axes.set_xticks(range(len(labels)), labels, rotation=90, fontsize=6)
    axes.set_yticks(range(len(labels)), labels, fontsize=6)
    axes.set_xlabel("resnet (forward order : width); boxed: one residual stream", fontsize=8)
    axes.set_title(title, fontsize=8)
    figure.colorbar(image, ax=axes, label="Pearson r", shrink=0.8)
    figure.tight_layout()
    figure.savefig(path, dpi=150, format="png")
    plt.close(figure)


def draw_attention_vs_timestep(
    vectors: list[torch.Tensor], timesteps: list[int], title: str, path: Path
) -> None:
    """A few channels of a few resnets: mean attention over images against the timestep, with a band of one
    standard deviation across images. Flat lines with thin bands are a constant attention."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sites = np.unique(np.linspace(0, len(vectors) - 1, FIGURE_SITES).round().astype(int))
    figure, axes = plt.subplots(1, len(sites), figsize=(3.2 * len(sites), 3.2), sharey=True, squeeze=False)
    for axis, site in zip(axes[0], sites):
        site_vectors = vectors[site].double()
        channels = np.unique(np.linspace(0, site_vectors.shape[-1] - 1, FIGURE_CHANNELS).round().astype(int))
        for channel in channels:
            mean, std = site_vectors[:, :, channel].mean(dim=1), site_vectors[:, :, channel].std(dim=1)
            (line,) = axis.plot(timesteps, mean, marker="o", markersize=3, label=f"channel {channel}")
            axis.fill_between(timesteps, mean - std, mean + std, color=line.get_color(), alpha=0.2)
        axis.set_title(f"resnet {site} (width {site_vectors.shape[-1]})", fontsize=9)
        axis.set_xlabel("timestep")
        axis.set_ylim(0, 1)
    axes[0][0].set_ylabel("attention (mean ± std over images)")
    axes[0][-1].legend(fontsize=7)
    figure.suptitle(title, fontsize=9)
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


def rounded(values) -> list:
    return [None if value is None or np.isnan(value) else round(float(value), 5) for value in values]


def analyze(args: argparse.Namespace) -> tuple[dict, list[torch.Tensor]]:
    """The JSON report, and the recorded attention vectors it summarises."""
    if len(args.timesteps) < 2 or args.num_images < 2:
        raise ValueError(
            "--timesteps and --num_images: the variations need at least 2 timesteps and 2 images"
        )
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
    matrix, profiles = layer_correlation(vectors), profile_correlation(vectors)
    widths = [site.channels for site in unet.resnet_sites]
    streams = residual_streams(unet)
    pairs = aligned_pairs(streams)
    per_width = {}
    for width in sorted(set(widths)):
        members = [index for index, w in enumerate(widths) if w == width]
        if len(members) > 1:
            per_width[str(width)] = mean_off_diagonal(matrix[np.ix_(members, members)])
    inputs, timesteps = input_variation(vectors), timestep_variation(vectors)
    report = {
        "model": str(args.model),
        "dia_attention": unet.config.dia_attention,
        "dia_sharing": unet.config.dia_sharing,
        "dia_condition": unet.config.get("dia_condition", "none"),
        "dia_global_cell": unet.config.get("dia_global_cell", "bottleneck"),
        "dataset": args.dataset,
        "split": args.split,
        "num_images": count,
        "timesteps": list(args.timesteps),
        "seed": args.seed,
        "site_widths": widths,
        "residual_streams": streams,
        "aligned_pairs": len(pairs),
        "mean_r_all_pairs": mean_off_diagonal(matrix),
        "mean_r_all_pairs_per_width": per_width,
        "mean_r_aligned_pairs": mean_over_pairs(matrix, pairs),
        "mean_r_profiles": mean_over_pairs(profiles, pairs),
        "input_variation_mean": float(np.mean(inputs)),
        "timestep_variation_mean": float(np.mean(timesteps)),
        "input_variation": rounded(inputs),
        "timestep_variation": rounded(timesteps),
        "correlation": [rounded(row) for row in matrix],
    }
    return report, vectors


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "analyze-correlation",
        help="Pearson correlation of channel attention between layers of a trained UNet, and what it depends on",
    )
    parser.add_argument(
        "--model", required=True, help="a trained pipeline folder (or a DIAUNet2DModel folder)"
    )
    parser.add_argument(
        "--dataset", required=True, help="real images to run through the model (a dataset spec)"
    )
    parser.add_argument("--split", default="test")
    parser.add_argument("--num_images", type=int, default=256)
    parser.add_argument("--timesteps", type=int, nargs="+", default=DEFAULT_TIMESTEPS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--out_dir",
        default=None,
        help="where to write correlation.json, correlation.png and attention_vs_timestep.png",
    )
    parser.set_defaults(func=run)


def describe(value: float | None) -> str:
    return "n/a (no aligned pairs)" if value is None else f"{value:.3f}"


def run(args: argparse.Namespace) -> int:
    out_dir = Path(args.out_dir or args.model)
    check_output_path(out_dir, "--out_dir", folder=True)
    # Before the model loads: a second analysis into the same folder is refused at once.
    out_lock = lock_output(out_dir.absolute(), "--out_dir", "analyze-correlation")
    try:
        report, vectors = analyze(args)
        write_report(out_dir, report, vectors)
    finally:
        out_lock.release()
    print(
        f"mean Pearson r: all equal-width pairs {report['mean_r_all_pairs']:.4f}, "
        f"aligned pairs {describe(report['mean_r_aligned_pairs'])} ({report['aligned_pairs']} pairs), "
        f"aligned mean profiles {describe(report['mean_r_profiles'])}"
    )
    print(
        f"attention std, mean over channels: across images {report['input_variation_mean']:.4f}, "
        f"across timesteps {report['timestep_variation_mean']:.4f}"
    )
    print(f"wrote correlation.json, correlation.png and attention_vs_timestep.png in {out_dir}")
    return 0


def write_report(out_dir: Path, report: dict, vectors: list[torch.Tensor]) -> None:
    """correlation.json and its two figures, moved into `out_dir` together once all three are drawn: a failed run
    leaves the previous analysis whole."""
    variant = report["dia_attention"]
    if variant != "se_per_layer":
        variant += f" ({report['dia_sharing']}, {report['dia_global_cell']} cell, condition {report['dia_condition']})"
    title = (
        f"{variant}\nmean r: all equal-width pairs {report['mean_r_all_pairs']:.3f}, aligned pairs "
        f"{describe(report['mean_r_aligned_pairs'])}, aligned profiles {describe(report['mean_r_profiles'])}\n"
        f"{report['num_images']} {report['dataset']} images x {len(report['timesteps'])} timesteps"
    )
    matrix = np.array(
        [[np.nan if value is None else value for value in row] for row in report["correlation"]]
    )
    variation = (
        f"{variant}: input variation {report['input_variation_mean']:.4f}, "
        f"timestep variation {report['timestep_variation_mean']:.4f}"
    )
    writers = {
        "correlation.png": lambda path: draw_heatmap(
            matrix, report["site_widths"], report["residual_streams"], title, path
        ),
        "attention_vs_timestep.png": lambda path: draw_attention_vs_timestep(
            vectors, report["timesteps"], variation, path
        ),
        REPORT_FILE: lambda path: path.write_text(json.dumps(report, indent=1)),
    }
    write_file_set(out_dir, writers, last=REPORT_FILE)
