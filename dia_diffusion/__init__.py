"""Dense-and-Implicit Attention (DIA) for diffusers UNets."""

import sys

from diffusers import ModelMixin  # noqa: F401  (diffusers' pipeline loader looks base classes up in the library module)

from dia_diffusion.models import unet_2d_dia
from dia_diffusion.models.unet_2d_condition_dia import DIAUNet2DConditionModel
from dia_diffusion.models.unet_2d_dia import DIAUNet2DModel
from dia_diffusion.pipelines.apply_dia import apply_dia

__all__ = ["DIAUNet2DConditionModel", "DIAUNet2DModel", "apply_dia"]
__version__ = "0.1.0"

# A saved pipeline names the module of each custom class in its model_index.json, and diffusers finds it in
# sys.modules. The classes say they live here, so pipelines saved now name `dia_diffusion`, wherever the files move;
# pipelines saved by releases whose DIAUNet2DModel lived in dia_diffusion/unet_dia.py name that module.
DIAUNet2DModel.__module__ = DIAUNet2DConditionModel.__module__ = __name__
sys.modules.setdefault(f"{__name__}.unet_dia", unet_2d_dia)
