"""Dense-and-Implicit Attention (DIA) for diffusers UNets."""

from diffusers import ModelMixin  # noqa: F401  (diffusers' pipeline loader looks base classes up in the library module)

from dia_diffusion.models.unet_2d_dia import DIAUNet2DModel

__all__ = ["DIAUNet2DModel"]
__version__ = "0.1.0"
