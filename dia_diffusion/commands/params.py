"""`dia-diffusion params`: parameter counts of the stock UNet and of every DIA variant for one UNet config."""

import argparse
import inspect
import json
from pathlib import Path

import torch
from diffusers import UNet2DModel

from dia_diffusion.models.dia_options import DIA_ARGUMENTS
from dia_diffusion.models.model_facts import count_parameters, stock_parameter_count
from dia_diffusion.models.unet_2d_dia import DIAUNet2DModel
from dia_diffusion.training.presets import PRESETS, unet_arguments

# The variants worth comparing, by the name the table prints: the DIA options that tell them apart.
VARIANTS: dict[str, dict] = {
    "dia_lstm/global": dict(dia_attention="dia_lstm", dia_sharing="global"),
    "dia_lstm/global+timestep": dict(
        dia_attention="dia_lstm", dia_sharing="global", dia_condition="timestep"
    ),
    "dia_lstm/global-widest": dict(dia_attention="dia_lstm", dia_sharing="global", dia_global_cell="widest"),
    "dia_lstm/global-widest+timestep": dict(
        dia_attention="dia_lstm", dia_sharing="global", dia_global_cell="widest", dia_condition="timestep"
    ),
    "dia_lstm/per_width": dict(dia_attention="dia_lstm", dia_sharing="per_width"),
    "dia_lstm/per_block": dict(dia_attention="dia_lstm", dia_sharing="per_block"),
    "dia_lstm/per_block+timestep": dict(
        dia_attention="dia_lstm", dia_sharing="per_block", dia_condition="timestep"
    ),
    "se_shared/global": dict(dia_attention="se_shared", dia_sharing="global"),
    "se_shared/per_width": dict(dia_attention="se_shared", dia_sharing="per_width"),
    "se_shared/per_block": dict(dia_attention="se_shared", dia_sharing="per_block"),
    "se_per_layer": dict(dia_attention="se_per_layer"),
}


def parameter_counts(unet_config: dict, **dia_options) -> list[dict]:
    """One row per variant: total parameters and what DIA adds to the stock UNet of the same config.

    Models are built on the `meta` device, so even large configs cost no memory or time.
    """
    config = {
        key: value
        for key, value in unet_config.items()
        if not key.startswith("_") and key not in DIA_ARGUMENTS
    }
    stock = stock_parameter_count(UNet2DModel, config)
    with torch.device("meta"):
        rows = [{"variant": "stock", "parameters": stock, "added": 0, "added_percent": 0.0}]
        for name, variant in VARIANTS.items():
            options = {**dia_options, **variant}
            if options.get("dia_sharing", "global") != "global" or "widest" in name or name == "se_per_layer":
                # The hidden width sets only the global bottleneck cell's width.
                options.pop("dia_hidden_channels", None)
            total = count_parameters(DIAUNet2DModel(**config, **options))
            rows.append(
                {
                    "variant": name,
                    "parameters": total,
                    "added": total - stock,
                    "added_percent": 100 * (total - stock) / stock,
                }
            )
    return rows


def preset_unet_config(preset: str) -> dict:
    """The UNet arguments of a training preset (`dia_diffusion.training.presets`), at the preset's resolution and channels."""
    if preset not in PRESETS:
        raise ValueError(f"--preset: unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    settings = PRESETS[preset].settings
    return unet_arguments(settings["unet_config"], settings["resolution"], settings["channels"])


def load_unet_config(path: str) -> dict:
    """A UNet config.json, or a folder holding one (a saved model, or a pipeline folder with unet/)."""
    candidates = [Path(path), Path(path) / "config.json", Path(path) / "unet" / "config.json"]
    file = next((candidate for candidate in candidates if candidate.is_file()), None)
    if file is None:
        raise ValueError(f"--config: no UNet config.json at {path}")
    try:
        config = json.loads(file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"--config: {file} is not a JSON file: {error}") from None
    if not isinstance(config, dict):
        raise ValueError(f"--config: {file} is not a UNet config (it holds a JSON {type(config).__name__})")
    accepted = set(inspect.signature(UNet2DModel.__init__).parameters) | set(DIA_ARGUMENTS)
    unknown = sorted(key for key in config if not key.startswith("_") and key not in accepted)
    if unknown:
        raise ValueError(f"--config: {file} is not a UNet config (unknown keys: {', '.join(unknown)})")
    return config


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("params", help="stock vs DIA parameter counts for a UNet config")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", help="a UNet config.json, or a saved model / pipeline folder")
    source.add_argument("--preset", help="the UNet of a training preset, e.g. cifar10-ddpm")
    parser.add_argument("--dia_reduction", type=int, default=4)
    parser.add_argument("--dia_hidden_channels", type=int, default=None)
    parser.add_argument("--json", action="store_true", help="print the rows as one JSON list")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    unet_config = preset_unet_config(args.preset) if args.preset else load_unet_config(args.config)
    rows = parameter_counts(
        unet_config,
        dia_reduction=args.dia_reduction,
        dia_hidden_channels=args.dia_hidden_channels,
    )
    if args.json:
        print(json.dumps(rows))
        return 0
    print(f"{'variant':<34}{'parameters':>14}{'added':>12}{'added %':>10}")
    for row in rows:
        print(f"{row['variant']:<34}{row['parameters']:>14,}{row['added']:>12,}{row['added_percent']:>9.2f}%")
    return 0
