"""`dia-diffusion params`: parameter counts of the stock UNet and of every DIA variant for one UNet config."""

import argparse
import inspect
import json
from pathlib import Path

import torch
from diffusers import UNet2DModel

from dia_diffusion.channel_attention import SHARING_MODES
from dia_diffusion.presets import PRESETS, unet_arguments
from dia_diffusion.unet_dia import DIA_ARGUMENTS, DIAUNet2DModel

# (attention kind, sharing mode) pairs worth comparing; per-layer SE ignores the sharing mode.
VARIANTS = (
    *(("dia_lstm", sharing) for sharing in SHARING_MODES),
    *(("se_shared", sharing) for sharing in SHARING_MODES),
    ("se_per_layer", "global"),
)


def count_parameters(module: torch.nn.Module) -> int:
    return sum(parameter.numel() for parameter in module.parameters())


def parameter_counts(unet_config: dict, **dia_options) -> list[dict]:
    """One row per variant: total parameters and what DIA adds to the stock UNet of the same config.

    Models are built on the `meta` device, so even large configs cost no memory or time.
    """
    config = {
        key: value
        for key, value in unet_config.items()
        if not key.startswith("_") and key not in DIA_ARGUMENTS
    }
    with torch.device("meta"):
        stock = count_parameters(UNet2DModel(**config))
        rows = [{"variant": "stock", "parameters": stock, "added": 0, "added_percent": 0.0}]
        for attention, sharing in VARIANTS:
            options = {**dia_options, "dia_attention": attention, "dia_sharing": sharing}
            if attention == "se_per_layer" or sharing != "global":
                options.pop("dia_hidden_channels", None)
            total = count_parameters(DIAUNet2DModel(**config, **options))
            name = attention if attention == "se_per_layer" else f"{attention}/{sharing}"
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
    """The UNet arguments of a training preset (`dia_diffusion.presets`), at the preset's resolution and channels."""
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
    print(f"{'variant':<22}{'parameters':>14}{'added':>12}{'added %':>10}")
    for row in rows:
        print(f"{row['variant']:<22}{row['parameters']:>14,}{row['added']:>12,}{row['added_percent']:>9.2f}%")
    return 0
