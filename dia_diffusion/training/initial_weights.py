"""`--init_unet`: a training run that starts from the weights of a saved UNet instead of a random initialisation.

The source is a pipeline folder, its `unet/` folder, or a Hugging Face hub name (downloaded into the hub cache).

The checkpoint decides the model. Its layout replaces the preset's `unet_config`, its `sample_size` and
`in_channels` set `resolution` and `channels`, and a DIA checkpoint's `dia_*` options and variant set the DIA
settings and `unet`. The preset's values are simply replaced; a setting given explicitly (a flag) that contradicts
the checkpoint is refused by name. `unet` then says what is trained:
- a stock checkpoint with `--unet stock` continues as it is; with `--unet dia|se-shared|se-per-layer` it is
  retrofitted through `DIAUNet2DModel.from_pretrained`, with the identity gate unless `--dia_gate` says otherwise,
  so that step 0 computes exactly what the checkpoint computes;
- a DIA checkpoint loads as it is; `--unet stock` is refused, since dropping its attention would change its output.

The noise schedule (`--beta_schedule`, `--num_train_timesteps`, `--prediction_type`) is not read from the source:
it stays the preset's or the flags'. The run record holds the source as given and `init_unet_sha256`, the sha256 of
its weights, so a run whose source has changed since it started is refused on resume.
"""

import json
from pathlib import Path
from typing import Any

import huggingface_hub
from diffusers import UNet2DModel

from dia_diffusion.models.dia_options import DIA_ARGUMENTS
from dia_diffusion.models.unet_2d_dia import DIAUNet2DModel
from dia_diffusion.runtime.file_digests import folder_weights_sha256
from dia_diffusion.training.presets import UNET_VARIANTS

CONFIG_FILENAME = "config.json"
# The files a UNet folder on the hub needs; configs first, so that only the weights of the UNet are downloaded.
HUB_CONFIG_PATTERNS = ("model_index.json", CONFIG_FILENAME, f"unet/{CONFIG_FILENAME}")
HUB_WEIGHT_SUFFIXES = ("safetensors", "bin")
# UNet2DModel arguments that follow the data rather than the layout (see presets.unet_arguments).
DATA_ARGUMENTS = ("sample_size", "in_channels", "out_channels")
UNET_VARIANT_OF_ATTENTION = {attention: variant for variant, attention in UNET_VARIANTS.items()}


class InitialUNetError(ValueError):
    """`--init_unet` names nothing loadable, or a setting contradicts it; one line for the user."""


def locate_unet_folder(source: str) -> Path:
    """The folder holding the UNet's `config.json` and weights: the source itself, its `unet/`, or a hub download."""
    path = Path(source).expanduser()
    if path.is_dir():
        return unet_folder_of(path, source)
    if path.exists():
        raise InitialUNetError(
            f"--init_unet '{source}' is a file; pass a pipeline folder, its unet/ folder or a hub name"
        )
    return unet_folder_of(download(source), source)


def unet_folder_of(folder: Path, source: str) -> Path:
    for candidate in (folder / "unet", folder):
        if (candidate / CONFIG_FILENAME).is_file():
            return candidate
    raise InitialUNetError(
        f"--init_unet '{source}' holds no UNet: neither {CONFIG_FILENAME} nor unet/{CONFIG_FILENAME}"
    )


def download(name: str) -> Path:
    """The hub snapshot of `name` with its configs and the UNet's weights (safetensors when the repository has them)."""
    try:
        snapshot = Path(huggingface_hub.snapshot_download(name, allow_patterns=list(HUB_CONFIG_PATTERNS)))
        prefix = "unet/" if (snapshot / "unet" / CONFIG_FILENAME).is_file() else ""
        for suffix in HUB_WEIGHT_SUFFIXES:
            snapshot = Path(
                huggingface_hub.snapshot_download(
                    name, allow_patterns=[*HUB_CONFIG_PATTERNS, f"{prefix}*.{suffix}"]
                )
            )
            if list((snapshot / prefix).glob(f"*.{suffix}")):
                return snapshot
    except (OSError, ValueError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise InitialUNetError(
            f"--init_unet '{name}' is not a local folder, and the Hugging Face hub cannot provide it: {reason}"
        ) from None
    raise InitialUNetError(f"--init_unet '{name}': the hub repository has no UNet weights")


def saved_config(folder: Path) -> tuple[type[UNet2DModel], dict[str, Any]]:
    """The saved model's class and its constructor arguments."""
    config = UNet2DModel.load_config(folder)
    class_name = config.get("_class_name")
    model_class = {"UNet2DModel": UNet2DModel, "DIAUNet2DModel": DIAUNet2DModel}.get(class_name)
    if model_class is None:
        raise InitialUNetError(f"--init_unet: {folder} holds a {class_name}, not a UNet2DModel")
    arguments, _, _ = model_class.extract_init_dict(config)
    return model_class, arguments


def checkpoint_settings(source: str) -> dict[str, Any]:
    """The training settings the checkpoint at `source` decides, keyed like TrainingConfig."""
    folder = locate_unet_folder(source)
    model_class, arguments = saved_config(folder)
    if arguments.get("out_channels", 3) != arguments.get("in_channels", 3):
        raise InitialUNetError(
            f"--init_unet '{source}': its UNet maps {arguments.get('in_channels')} channels to "
            f"{arguments.get('out_channels')}; training needs a UNet whose output matches its input"
        )
    if not (list(folder.glob("*.safetensors")) or list(folder.glob("*.bin"))):
        raise InitialUNetError(f"--init_unet '{source}': {folder} holds no weights (*.safetensors or *.bin)")
    settings: dict[str, Any] = {
        "unet_config": {
            key: value
            for key, value in arguments.items()
            if key not in DATA_ARGUMENTS and key not in DIA_ARGUMENTS
        },
        "channels": arguments.get("in_channels", 3),
        "init_unet_sha256": folder_weights_sha256(folder),
    }
    sample_size = arguments.get("sample_size")
    if isinstance(sample_size, (list, tuple)):
        if len(set(sample_size)) != 1:
            raise InitialUNetError(
                f"--init_unet '{source}': its sample_size {sample_size} is not square; training uses square images"
            )
        sample_size = sample_size[0]
    if sample_size is not None:
        settings["resolution"] = sample_size
    if model_class is DIAUNet2DModel:
        settings.update(saved_dia_settings(arguments, f"--init_unet '{source}'", InitialUNetError))
    return settings


def saved_dia_settings(arguments: dict[str, Any], source: str, error: type[ValueError]) -> dict[str, Any]:
    """`unet` and the `dia_*` settings of a saved DIA UNet's constructor `arguments`: such a UNet continues with
    the attention it was trained with. `source` names it in the `error` raised for an attention no variant trains."""
    attention = arguments["dia_attention"]
    if attention not in UNET_VARIANT_OF_ATTENTION:
        raise error(
            f"{source} holds a DIA UNet with dia_attention {attention!r}, which no --unet variant trains"
        )
    return {
        "unet": UNET_VARIANT_OF_ATTENTION[attention],
        **{name: arguments[name] for name in DIA_ARGUMENTS if name != "dia_attention" and name in arguments},
    }


def initial_unet_settings(source: str, unet_variant: str, given: dict[str, Any]) -> dict[str, Any]:
    """The training settings that the `--init_unet` checkpoint `source` decides, for a run of `--unet
    unet_variant`; `given` holds the settings given explicitly.

    Raises InitialUNetError naming the first explicit setting that contradicts the checkpoint.
    """
    return settled(
        checkpoint_settings(source), unet_variant, given, f"--init_unet '{source}'", InitialUNetError
    )


def settled(
    decided: dict[str, Any], unet_variant: str, given: dict[str, Any], source: str, error: type[ValueError]
) -> dict[str, Any]:
    """The settings a saved model `decided`, checked against those `given` explicitly, plus the gate of a retrofit.

    A DIA UNet decides `unet`; a stock UNet that `--unet unet_variant` retrofits with DIA gets the identity gate
    unless `--dia_gate` is given. Raises `error`, naming `source`, for the first explicit setting that contradicts
    the saved model.
    """
    for key, value in decided.items():
        if key in given and not same_setting(given[key], value):
            if key == "unet":
                raise error(
                    f"--unet {given[key]} cannot start from {source}: it holds a DIA UNet trained as "
                    f"--unet {value}; pass --unet {value} (or leave --unet out)"
                )
            raise error(
                f"--{key} {given[key]!r} contradicts {source}, whose UNet has {key} {value!r}; leave --{key} out"
            )
    retrofit = "unet" not in decided and UNET_VARIANTS.get(unet_variant) is not None
    if retrofit and "dia_gate" not in given:
        # Exactly the identity at step 0, so the retrofitted run starts from what the checkpoint computes.
        return {**decided, "dia_gate": "identity"}
    return decided


def same_setting(first: Any, second: Any) -> bool:
    """Equal once tuples and lists are compared alike (a JSON-loaded config holds lists)."""
    return json.loads(json.dumps(first)) == json.loads(json.dumps(second))


def load_initial_unet(source: str, unet_variant: str, dia_options: dict[str, Any]) -> UNet2DModel:
    """The model a run with `--init_unet source` starts from, in training mode: the saved UNet, retrofitted with DIA
    (`dia_options`) when `--unet unet_variant` asks for it."""
    folder = locate_unet_folder(source)
    model_class, _ = saved_config(folder)
    attention = UNET_VARIANTS[unet_variant]
    try:
        if attention is None or model_class is DIAUNet2DModel:
            unet = model_class.from_pretrained(folder)
        else:
            unet = DIAUNet2DModel.from_pretrained(folder, dia_attention=attention, **dia_options)
    except (OSError, ValueError, RuntimeError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise InitialUNetError(f"--init_unet '{source}' cannot be loaded: {reason}") from None
    # diffusers' from_pretrained returns a model in eval mode, which would train without dropout; a retrofit is
    # built in training mode, so a stock continuation would not see the noise of its paired retrofit either.
    return unet.train()
