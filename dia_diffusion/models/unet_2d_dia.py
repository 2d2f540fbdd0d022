"""DIAUNet2DModel: diffusers' UNet2DModel with ONE Dense-and-Implicit Attention module shared by all its resnets.

DIA (Dense-and-Implicit Attention) observes that attention modules placed independently in every layer produce
strongly correlated attention maps (Pearson up to 0.85), so it shares one module across layers and lets an LSTM
calibrate each layer's attention and carry it to the next. Here the shared module gates the residual branch of every
`ResnetBlock2D` (after its second convolution, before the shortcut add), in forward-execution order
down -> mid -> up, with its recurrent state starting at zero in every forward call. The model runs diffusers' own
forward; how the resnets reach the shared module and its state is `dia_resnet.py`.
"""

import torch
from diffusers import (
    ModelMixin,  # noqa: F401  (diffusers' pipeline loader looks base classes up in this module)
    UNet2DModel,
)
from diffusers.configuration_utils import register_to_config
from diffusers.models.unets.unet_2d import UNet2DOutput

from dia_diffusion.models.dia_model import DIAModelMixin
from dia_diffusion.models.dia_options import dia_options_of


class DIAUNet2DModel(DIAModelMixin, UNet2DModel):
    r"""A `UNet2DModel` whose resnets share one DIA channel-attention module.

    Takes every argument of [`UNet2DModel`] (same names and defaults), plus:
        dia_attention (`str`, defaults to `"dia_lstm"`): `"dia_lstm"` (the paper's shared SE + LSTM), `"se_shared"`
            (one shared SE, no LSTM), `"se_per_layer"` (an independent SE in every resnet) or `"none"` (the stock
            UNet, exactly).
        dia_sharing (`str`, defaults to `"global"`): `"global"` (one module for all widths), `"per_width"` or
            `"per_block"`.
        dia_reduction (`int`, defaults to 4): bottleneck reduction ratio `r` of the SE / LSTM gate maps.
        dia_hidden_channels (`int`, *optional*): width of the globally shared cell; defaults to the narrowest width.
        dia_gate (`str`, defaults to `"sigmoid"`): `"sigmoid"` multiplies the branch by the attention (the paper);
            `"identity"` is exactly the identity at initialisation (for retrofitting pretrained UNets).
        dia_condition (`str`, defaults to `"none"`): `"timestep"` adds the projected time embedding to the cell's
            input at every resnet, so one shared cell can attend differently at different noise levels.
        dia_global_cell (`str`, defaults to `"bottleneck"`): how the global cell serves every width: `"bottleneck"`
            (a cell at `dia_hidden_channels` with input and output adapters) or `"widest"` (a cell at the widest
            width, input adapters only, its own sigmoid output sliced per width). See `channel_attention.py`.
    """

    stock_class = UNet2DModel

    @register_to_config
    def __init__(
        self,
        sample_size: int | tuple[int, int] | None = None,
        in_channels: int = 3,
        out_channels: int = 3,
        center_input_sample: bool = False,
        time_embedding_type: str = "positional",
        time_embedding_dim: int | None = None,
        freq_shift: int = 0,
        flip_sin_to_cos: bool = True,
        down_block_types: tuple[str, ...] = (
            "DownBlock2D",
            "AttnDownBlock2D",
            "AttnDownBlock2D",
            "AttnDownBlock2D",
        ),
        mid_block_type: str | None = "UNetMidBlock2D",
        up_block_types: tuple[str, ...] = ("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        block_out_channels: tuple[int, ...] = (224, 448, 672, 896),
        layers_per_block: int = 2,
        mid_block_scale_factor: float = 1,
        downsample_padding: int = 1,
        downsample_type: str = "conv",
        upsample_type: str = "conv",
        dropout: float = 0.0,
        act_fn: str = "silu",
        attention_head_dim: int | None = 8,
        norm_num_groups: int = 32,
        attn_norm_num_groups: int | None = None,
        norm_eps: float = 1e-5,
        resnet_time_scale_shift: str = "default",
        add_attention: bool = True,
        class_embed_type: str | None = None,
        num_class_embeds: int | None = None,
        num_train_timesteps: int | None = None,
        dia_attention: str = "dia_lstm",
        dia_sharing: str = "global",
        dia_reduction: int = 4,
        dia_hidden_channels: int | None = None,
        dia_gate: str = "sigmoid",
        dia_condition: str = "none",
        dia_global_cell: str = "bottleneck",
    ):
        if resnet_time_scale_shift not in ("default", "scale_shift"):
            # "ada_group" and "spatial" build ResnetBlockCondNorm2D, whose conditioned normalisation DIA does not gate.
            raise ValueError(
                "resnet_time_scale_shift must be 'default' or 'scale_shift' for DIAUNet2DModel, got "
                f"{resnet_time_scale_shift!r}"
            )
        dia_options = dia_options_of(
            dia_attention,
            dia_sharing,
            dia_reduction,
            dia_hidden_channels,
            dia_gate,
            dia_condition,
            dia_global_cell,
        )
        super().__init__(
            sample_size=sample_size,
            in_channels=in_channels,
            out_channels=out_channels,
            center_input_sample=center_input_sample,
            time_embedding_type=time_embedding_type,
            time_embedding_dim=time_embedding_dim,
            freq_shift=freq_shift,
            flip_sin_to_cos=flip_sin_to_cos,
            down_block_types=down_block_types,
            mid_block_type=mid_block_type,
            up_block_types=up_block_types,
            block_out_channels=block_out_channels,
            layers_per_block=layers_per_block,
            mid_block_scale_factor=mid_block_scale_factor,
            downsample_padding=downsample_padding,
            downsample_type=downsample_type,
            upsample_type=upsample_type,
            dropout=dropout,
            act_fn=act_fn,
            attention_head_dim=attention_head_dim,
            norm_num_groups=norm_num_groups,
            attn_norm_num_groups=attn_norm_num_groups,
            norm_eps=norm_eps,
            resnet_time_scale_shift=resnet_time_scale_shift,
            add_attention=add_attention,
            class_embed_type=class_embed_type,
            num_class_embeds=num_class_embeds,
            num_train_timesteps=num_train_timesteps,
        )
        self.install_dia(dia_options)

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        class_labels: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> UNet2DOutput | tuple:
        return self.dia_forward(super().forward, sample, timestep, class_labels, return_dict)
