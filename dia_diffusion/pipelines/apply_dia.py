"""`apply_dia(pipeline_or_unet, **dia_options)`: DIA retrofitted onto a pipeline's UNet (or a UNet), in the style of
diffusers' `pipeline.enable_freeu(...)`.

The UNet is replaced by its DIA twin (`from_unet`: every stock weight copied key for key, the gate the identity unless
told otherwise), so the pipeline computes exactly what it computed before until the DIA weights are trained, and
`save_pretrained` then writes the DIA class into `model_index.json`, which `from_pretrained` loads after
`import dia_diffusion`.
"""

from diffusers import UNet2DConditionModel, UNet2DModel

from dia_diffusion.models.dia_model import DIAModelMixin
from dia_diffusion.models.unet_2d_condition_dia import DIAUNet2DConditionModel
from dia_diffusion.models.unet_2d_dia import DIAUNet2DModel

# Checked in order: the DIA class of the first stock class the UNet is an instance of.
DIA_CLASS_OF = ((UNet2DConditionModel, DIAUNet2DConditionModel), (UNet2DModel, DIAUNet2DModel))


def dia_unet(unet, **dia_options) -> DIAModelMixin:
    """The DIA twin of a stock `UNet2DModel` or `UNet2DConditionModel`."""
    if isinstance(unet, DIAModelMixin):
        raise ValueError(f"the UNet is already a {type(unet).__name__}; DIA is applied once")
    for stock_class, dia_class in DIA_CLASS_OF:
        if isinstance(unet, stock_class):
            return dia_class.from_unet(unet, **dia_options)
    supported = ", ".join(stock_class.__name__ for stock_class, _ in DIA_CLASS_OF)
    raise ValueError(f"DIA applies to a {supported}, not to a {type(unet).__name__}")


def apply_dia(pipeline_or_unet, **dia_options):
    """Returns the pipeline with its UNet retrofitted with DIA, or the retrofitted UNet when given a UNet.

    `dia_options` are the `dia_*` arguments of `DIAUNet2DModel` (`dia_gate` defaults to `"identity"` here). The
    pipeline is changed in place and returned, as diffusers' own `enable_*` methods change it.
    """
    unet = getattr(pipeline_or_unet, "unet", None)
    if unet is None:
        return dia_unet(pipeline_or_unet, **dia_options)
    pipeline_or_unet.unet = dia_unet(unet, **dia_options)
    return pipeline_or_unet
