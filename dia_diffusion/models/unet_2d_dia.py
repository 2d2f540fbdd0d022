"""DIAUNet2DModel: diffusers' UNet2DModel with ONE Dense-and-Implicit Attention module shared by all its resnets.

DIA (Dense-and-Implicit Attention) observes that attention modules placed independently in every layer produce
strongly correlated attention maps (Pearson up to 0.85), so it shares one module across layers and lets an LSTM
calibrate each layer's attention and carry it to the next. Here the shared module gates the residual branch of every
`ResnetBlock2D` (after its second convolution, before the shortcut add), in forward-execution order
down -> mid -> up. Its recurrent state starts at zero in every forward call and is passed from resnet to resnet as
explicit arguments, never through hooks or attributes, so gradient checkpointing re-runs each resnet with the state
it saw the first time.
"""

import functools
import inspect
from dataclasses import dataclass, field

import torch
from diffusers import (
    ModelMixin,  # noqa: F401  (diffusers' pipeline loader looks base classes up in this module)
    UNet2DModel,
)
from diffusers.configuration_utils import register_to_config
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.unets.unet_2d import UNet2DOutput

from dia_diffusion.models.channel_attention import ChannelAttention, ResnetSite
from dia_diffusion.models.dia_options import DIA_ARGUMENTS, check_dia_arguments

SUPPORTED_DOWN_BLOCKS = ("DownBlock2D", "AttnDownBlock2D", "ResnetDownsampleBlock2D")
SUPPORTED_MID_BLOCKS = ("UNetMidBlock2D", None)
SUPPORTED_UP_BLOCKS = ("UpBlock2D", "AttnUpBlock2D", "ResnetUpsampleBlock2D")


def check_block_types(down_block_types, mid_block_type, up_block_types, resnet_time_scale_shift) -> None:
    """DIA re-runs the blocks' layers itself, so it accepts only the blocks built from plain ResnetBlock2D."""
    for name, block_types, supported in (
        ("down_block_types", down_block_types, SUPPORTED_DOWN_BLOCKS),
        ("up_block_types", up_block_types, SUPPORTED_UP_BLOCKS),
        ("mid_block_type", (mid_block_type,), SUPPORTED_MID_BLOCKS),
    ):
        for block_type in block_types:
            if block_type not in supported:
                raise ValueError(
                    f"{name}: block type {block_type!r} is not supported by DIAUNet2DModel; use one of {supported}"
                )
    if resnet_time_scale_shift not in ("default", "scale_shift"):
        raise ValueError(
            f"resnet_time_scale_shift must be 'default' or 'scale_shift' for DIAUNet2DModel, got {resnet_time_scale_shift!r}"
        )


@dataclass
class AttentionPass:
    """What one forward call carries from resnet to resnet: the index of the next site, each cell's recurrent state
    (keyed like `ChannelAttention.site_cells`) and the projected time embedding (None without conditioning)."""

    condition: torch.Tensor | None
    site: int = 0
    states: dict = field(default_factory=dict)


class DIAUNet2DModel(UNet2DModel):
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
        check_block_types(down_block_types, mid_block_type, up_block_types, resnet_time_scale_shift)
        dia_options = dict(
            attention=dia_attention,
            sharing=dia_sharing,
            reduction=dia_reduction,
            hidden_channels=dia_hidden_channels,
            gate=dia_gate,
            condition=dia_condition,
            global_cell=dia_global_cell,
        )
        check_dia_arguments(**dia_options)
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
        # The blocks' own checkpointing flags are never read: forward() checkpoints each resnet itself.
        self.gradient_checkpointing = False
        self.resnet_sites = tuple(
            ResnetSite(block, resnet.out_channels) for block, resnet in self.resnets_in_order()
        )
        if dia_attention == "none":
            self.channel_attention = None
        else:
            self.channel_attention = ChannelAttention(
                self.resnet_sites, **dia_options, condition_channels=self.time_embedding.linear_2.out_features
            )

    def resnets_in_order(self):
        """Yields `(block_index, resnet)` for every ResnetBlock2D in the order forward() runs them."""
        blocks = [
            *self.down_blocks,
            *([self.mid_block] if self.mid_block is not None else []),
            *self.up_blocks,
        ]
        for index, block in enumerate(blocks):
            samplers = getattr(block, "downsamplers", None) or getattr(block, "upsamplers", None) or []
            for resnet in [*block.resnets, *samplers]:
                if isinstance(resnet, ResnetBlock2D):
                    yield index, resnet

    @classmethod
    def from_unet(cls, unet: UNet2DModel, **dia_options) -> "DIAUNet2DModel":
        """Retrofits a stock (e.g. pretrained) UNet2DModel: copies every weight key for key and adds DIA.

        The gate defaults to `"identity"`, so the result computes exactly what `unet` computes until it is trained.
        """
        if isinstance(unet, DIAUNet2DModel):
            raise ValueError("from_unet expects a stock UNet2DModel; this model already has DIA")
        unknown = sorted(set(dia_options) - set(DIA_ARGUMENTS))
        if unknown:
            raise ValueError(f"unknown DIA option(s) {unknown}; expected some of {DIA_ARGUMENTS}")
        accepted = inspect.signature(cls.__init__).parameters
        config = {key: value for key, value in unet.config.items() if key in accepted}
        config.update({"dia_gate": "identity", **dia_options})
        model = cls(**config)
        missing, unexpected = model.load_state_dict(unet.state_dict(), strict=False)
        added = {key for key in model.state_dict() if key.startswith("channel_attention.")}
        if unexpected or set(missing) != added:
            raise RuntimeError(
                "retrofit key accounting failed: stock keys not used "
                f"{sorted(unexpected)}, keys left uninitialised {sorted(set(missing) - added)}"
            )
        if (model.device, model.dtype) == (unet.device, unet.dtype):
            return model
        return model.to(device=unet.device, dtype=unet.dtype)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """Loads a DIAUNet2DModel checkpoint, or retrofits a stock UNet2DModel checkpoint through `from_unet`.

        DIA options (`dia_attention=...` etc.) may be given only for a stock checkpoint; a DIA checkpoint's options
        come from its config.
        """
        dia_options = {name: kwargs.pop(name) for name in DIA_ARGUMENTS if name in kwargs}
        config = cls.load_config(pretrained_model_name_or_path, **dict(kwargs))
        if config.get("_class_name") == cls.__name__:
            if dia_options:
                raise ValueError(
                    f"{sorted(dia_options)} cannot change a saved DIAUNet2DModel; its config sets them"
                )
            return super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        stock = UNet2DModel.from_pretrained(pretrained_model_name_or_path, **kwargs)
        return cls.from_unet(stock, **dia_options)

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        class_labels: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> UNet2DOutput | tuple:
        # Adapted from diffusers UNet2DModel.forward (diffusers 0.42): steps 0-2 and 6 are the stock code; steps 3-5
        # run the blocks' layers here so that the DIA state can travel from resnet to resnet as an argument.
        # 0. center input if necessary
        if self.config.center_input_sample:
            sample = 2 * sample - 1.0

        # 1. time
        timesteps = timestep
        if not torch.is_tensor(timesteps):
            timesteps = torch.tensor([timesteps], dtype=torch.long, device=sample.device)
        elif len(timesteps.shape) == 0:
            timesteps = timesteps[None].to(sample.device)
        timesteps = timesteps * torch.ones(sample.shape[0], dtype=timesteps.dtype, device=timesteps.device)
        emb = self.time_embedding(self.time_proj(timesteps).to(dtype=self.dtype))
        if self.class_embedding is not None:
            if class_labels is None:
                raise ValueError("class_labels should be provided when doing class conditioning")
            if self.config.class_embed_type == "timestep":
                class_labels = self.time_proj(class_labels)
            emb = emb + self.class_embedding(class_labels).to(dtype=self.dtype)
        elif class_labels is not None:
            raise ValueError("class_embedding needs to be initialized in order to use class conditioning")

        # 2. pre-process
        sample = self.conv_in(sample)

        # The DIA state starts empty in every call; the time embedding is projected once for all resnets.
        dia = AttentionPass(
            self.channel_attention.project_condition(emb) if self.channel_attention is not None else None
        )

        # 3. down
        down_block_res_samples = (sample,)
        for block in self.down_blocks:
            attentions = getattr(block, "attentions", None)
            for index, resnet in enumerate(block.resnets):
                sample = self._run_resnet(resnet, sample, emb, dia)
                if attentions is not None:
                    sample = attentions[index](sample)
                down_block_res_samples += (sample,)
            if block.downsamplers is not None:
                for downsampler in block.downsamplers:
                    if isinstance(downsampler, ResnetBlock2D):
                        sample = self._run_resnet(downsampler, sample, emb, dia)
                    else:
                        sample = downsampler(sample)
                down_block_res_samples += (sample,)

        # 4. mid
        if self.mid_block is not None:
            sample = self._run_resnet(self.mid_block.resnets[0], sample, emb, dia)
            for attention, resnet in zip(self.mid_block.attentions, self.mid_block.resnets[1:]):
                if attention is not None:
                    sample = attention(sample, temb=emb)
                sample = self._run_resnet(resnet, sample, emb, dia)

        # 5. up
        for block in self.up_blocks:
            attentions = getattr(block, "attentions", None)
            for index, resnet in enumerate(block.resnets):
                skip = down_block_res_samples[-1]
                down_block_res_samples = down_block_res_samples[:-1]
                sample = self._run_resnet(resnet, torch.cat([sample, skip], dim=1), emb, dia)
                if attentions is not None:
                    sample = attentions[index](sample)
            if block.upsamplers is not None:
                for upsampler in block.upsamplers:
                    if isinstance(upsampler, ResnetBlock2D):
                        sample = self._run_resnet(upsampler, sample, emb, dia)
                    else:
                        sample = upsampler(sample)

        # 6. post-process
        sample = self.conv_out(self.conv_act(self.conv_norm_out(sample)))
        if self.config.time_embedding_type == "fourier":
            sample = sample / timesteps.reshape((sample.shape[0], *([1] * len(sample.shape[1:]))))

        if not return_dict:
            return (sample,)
        return UNet2DOutput(sample=sample)

    def _run_resnet(
        self, resnet: ResnetBlock2D, sample: torch.Tensor, temb: torch.Tensor, dia: "AttentionPass"
    ):
        """Runs the next resnet with its DIA state, checkpointed when gradient checkpointing is on; advances `dia`."""
        site, condition = dia.site, dia.condition
        key = self.channel_attention.site_cells[site] if self.channel_attention is not None else None
        hidden, cell = dia.states.get(key, (None, None))
        if torch.is_grad_enabled() and self.gradient_checkpointing:
            run = functools.partial(self._resnet_forward, resnet, site)
            sample, hidden, cell = self._gradient_checkpointing_func(
                run, sample, temb, hidden, cell, condition
            )
        else:
            sample, hidden, cell = self._resnet_forward(resnet, site, sample, temb, hidden, cell, condition)
        dia.states[key] = (hidden, cell)
        dia.site += 1
        return sample

    def _resnet_forward(self, resnet: ResnetBlock2D, site: int, input_tensor, temb, hidden, cell, condition):
        # Adapted from diffusers ResnetBlock2D.forward (diffusers 0.42), with the channel attention inserted on the
        # residual branch after conv2, before the shortcut add and output_scale_factor (DIANet's placement).
        hidden_states = resnet.nonlinearity(resnet.norm1(input_tensor))
        if resnet.upsample is not None:
            if hidden_states.shape[0] >= 64:
                input_tensor = input_tensor.contiguous()
                hidden_states = hidden_states.contiguous()
            input_tensor = resnet.upsample(input_tensor)
            hidden_states = resnet.upsample(hidden_states)
        elif resnet.downsample is not None:
            input_tensor = resnet.downsample(input_tensor)
            hidden_states = resnet.downsample(hidden_states)
        hidden_states = resnet.conv1(hidden_states)

        if resnet.time_emb_proj is not None:
            if not resnet.skip_time_act:
                temb = resnet.nonlinearity(temb)
            temb = resnet.time_emb_proj(temb)[:, :, None, None]
        if resnet.time_embedding_norm == "default":
            if temb is not None:
                hidden_states = hidden_states + temb
            hidden_states = resnet.norm2(hidden_states)
        else:
            time_scale, time_shift = torch.chunk(temb, 2, dim=1)
            hidden_states = resnet.norm2(hidden_states) * (1 + time_scale) + time_shift
        hidden_states = resnet.conv2(resnet.dropout(resnet.nonlinearity(hidden_states)))

        if self.channel_attention is not None:
            state = None if hidden is None else (hidden, cell)
            hidden_states, state = self.channel_attention(hidden_states, site, state, condition)
            hidden, cell = (None, None) if state is None else state

        if resnet.conv_shortcut is not None:
            if resnet.training:
                input_tensor = input_tensor.contiguous()
            input_tensor = resnet.conv_shortcut(input_tensor)
        return (input_tensor + hidden_states) / resnet.output_scale_factor, hidden, cell
