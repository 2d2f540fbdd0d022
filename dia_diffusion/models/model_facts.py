"""What a saved model's card states about it: its parameters against the stock UNet of the same layout, its DIA
options, and what it is (see `dia_diffusion/hub/model_card.py`, which writes the card)."""

from typing import Any

import torch

from dia_diffusion.hub.model_card import DIA_UNET, UNCONDITIONAL_UNET, CardTask, ModelFacts
from dia_diffusion.models.dia_options import DIA_ARGUMENTS


def count_parameters(module: torch.nn.Module) -> int:
    return sum(parameter.numel() for parameter in module.parameters())


def stock_parameter_count(stock_class: type, config: dict) -> int:
    """Parameters of `stock_class` (e.g. `UNet2DModel`) built from a DIA model's config without its `dia_*` options.

    Built on the `meta` device, so even large layouts cost no memory or time.
    """
    arguments = {
        key: value for key, value in config.items() if not key.startswith("_") and key not in DIA_ARGUMENTS
    }
    with torch.device("meta"):
        return count_parameters(stock_class(**arguments))


def model_facts(model: torch.nn.Module, task: CardTask, source: str, **run_facts: Any) -> ModelFacts:
    """The card's facts about `model` (a DIA model, or a stock one), plus what a run adds (`ModelFacts` fields:
    base_model, datasets, training, metric, sample_grid, ...)."""
    config = dict(model.config)
    stock_class = getattr(type(model), "stock_class", type(model))
    return ModelFacts(
        class_name=type(model).__name__,
        task=task,
        source=source,
        dia_options={name: config[name] for name in DIA_ARGUMENTS if name in config},
        parameters=count_parameters(model),
        stock_class_name=stock_class.__name__,
        stock_parameters=stock_parameter_count(stock_class, config),
        **run_facts,
    )


def model_card_task(model: torch.nn.Module) -> CardTask:
    """What a model's own card says it is: its class's `model_card_task`, else by the stock class it extends."""
    stock_class = getattr(type(model), "stock_class", type(model))
    default = UNCONDITIONAL_UNET if stock_class.__name__ == "UNet2DModel" else DIA_UNET
    return getattr(model, "model_card_task", default)
