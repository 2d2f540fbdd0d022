"""What a diffusers UNet class adds to carry DIA: one shared `ChannelAttention` (owned once, as
`channel_attention`) wired to all its resnets, diffusers' own forward run as one DIA call, gradient checkpointing
that re-runs only the resnets' pure steps, and retrofitting a stock UNet of the same family.

The resnet side of the mechanism (the DIA resnet, the per-call state, why the pure step is the only checkpointed
part) is `dia_resnet.py`. Model classes: `unet_2d_dia.py` (UNet2DModel) and `unet_2d_condition_dia.py`
(UNet2DConditionModel: class-conditional DDPMs and Stable Diffusion).
"""

import copy
import inspect
from collections.abc import Iterator

import torch
from diffusers.models.attention_processor import Attention
from diffusers.models.resnet import ResnetBlock2D

from dia_diffusion.hub.model_card import model_cards_wanted, write_model_card
from dia_diffusion.hub.upload import hub_repo_id, push_folder
from dia_diffusion.models.channel_attention import ChannelAttention, ResnetSite
from dia_diffusion.models.dia_options import DIA_ARGUMENTS
from dia_diffusion.models.dia_resnet import CheckpointDIAResnetsInside, DIACall, DIAResnetBlock2D
from dia_diffusion.models.model_facts import model_card_task, model_facts

# The factors `enable_freeu` sets on each up block of a UNet2DConditionModel.
FREEU_FACTORS = ("s1", "s2", "b1", "b2")


def carry_runtime_state(stock: torch.nn.Module, model: torch.nn.Module) -> None:
    """Copies what diffusers sets on a UNet beside its config and weights, so that the retrofit `model` computes what
    `stock` computes: each attention layer's processor (`set_attn_processor`), FreeU's factors (`enable_freeu`), and
    training or eval mode (`from_pretrained` returns eval mode, which turns dropout off)."""
    modules = dict(model.named_modules())
    for name, module in stock.named_modules():
        if isinstance(module, Attention):
            modules[name].set_processor(copy.deepcopy(module.processor))
    for stock_block, block in zip(stock.up_blocks, model.up_blocks, strict=True):
        for factor in FREEU_FACTORS:
            if getattr(stock_block, factor, None) is not None:
                setattr(block, factor, getattr(stock_block, factor))
    model.train(stock.training)


class DIAModelMixin:
    """Wires a diffusers UNet's resnets to one shared `ChannelAttention` (owned once, as `channel_attention`).

    A model class names its stock class (`stock_class`), spells out every argument of the stock `__init__` plus the
    `dia_*` ones, calls `install_dia` at the end of `__init__` and runs diffusers' own forward through `dia_forward`.
    With `dia_attention="none"` nothing is installed and the model is the stock one.
    """

    stock_class: type

    def dia_blocks(self) -> list[torch.nn.Module]:
        return [*self.down_blocks, *([self.mid_block] if self.mid_block is not None else []), *self.up_blocks]

    def resnets_in_order(self) -> Iterator[tuple[int, ResnetBlock2D]]:
        """`(block_index, resnet)` for every resnet, in the order diffusers' forward runs them: down blocks, the mid
        block, up blocks; within a block, in the order the block registered them (its resnets, then a resnet down- or
        upsampler). `DIAResnetBlock2D.forward` checks at every call that this is the order they run in."""
        for index, block in enumerate(self.dia_blocks()):
            for module in block.modules():
                if isinstance(module, ResnetBlock2D):
                    yield index, module

    def check_dia_blocks(self) -> None:
        """DIA gates the branch of plain `ResnetBlock2D`s; a block built from anything else (the K-blocks'
        `ResnetBlockCondNorm2D`, say) is refused by name."""
        for block in self.dia_blocks():
            resnets = list(getattr(block, "resnets", []))
            if not resnets or not all(
                type(resnet) in (ResnetBlock2D, DIAResnetBlock2D) for resnet in resnets
            ):
                kinds = sorted({type(resnet).__name__ for resnet in resnets}) or ["no resnets"]
                raise ValueError(
                    f"block type {type(block).__name__} is not supported by {type(self).__name__}: DIA needs blocks "
                    f"built from ResnetBlock2D, it has {', '.join(kinds)}"
                )

    def install_dia(self, dia_options: dict) -> None:
        """Builds the shared `ChannelAttention` for this model's resnets and turns them into DIA resnets."""
        self.check_dia_blocks()
        resnets = [resnet for _, resnet in self.resnets_in_order()]
        self.resnet_sites = tuple(
            ResnetSite(block, resnet.conv2.out_channels) for block, resnet in self.resnets_in_order()
        )
        self.dia_call = None
        if dia_options["attention"] == "none":
            self.channel_attention = None
            return
        # The embedding every resnet receives (time, and class or SDXL's added embeddings where the model has them).
        condition_channels = (
            resnets[0].time_emb_proj.in_features if resnets[0].time_emb_proj is not None else None
        )
        self.channel_attention = ChannelAttention(
            self.resnet_sites, **dia_options, condition_channels=condition_channels
        )
        self.dia_call = DIACall(self.channel_attention)
        for site, resnet in enumerate(resnets):
            resnet.__class__ = DIAResnetBlock2D
            resnet.dia_call = self.dia_call
            resnet.dia_site = site

    def dia_forward(self, forward, *args, **kwargs):
        """Runs `forward` (diffusers' own) as one DIA call: the state starts from zero, is never carried across calls,
        and is dropped when the call ends, so that a forward without backward leaves no autograd graph behind."""
        if self.dia_call is None:
            return forward(*args, **kwargs)
        self.dia_call.reset()
        try:
            return forward(*args, **kwargs)
        finally:
            self.dia_call.reset()

    def _set_gradient_checkpointing(self, enable: bool = True, gradient_checkpointing_func=None) -> None:
        checkpoint = gradient_checkpointing_func or torch.utils.checkpoint.checkpoint
        super()._set_gradient_checkpointing(enable, checkpoint)
        if self.dia_call is None:
            return
        for module in self.modules():
            if isinstance(module, DIAResnetBlock2D):
                module.dia_checkpoint = checkpoint if enable else None
            elif hasattr(module, "gradient_checkpointing"):
                module._gradient_checkpointing_func = CheckpointDIAResnetsInside(checkpoint)

    @classmethod
    def from_unet(cls, unet, **dia_options):
        """Retrofits a stock (e.g. pretrained) UNet of `stock_class`: copies every weight key for key and adds DIA.

        The gate defaults to `"identity"`, so the result computes exactly what `unet` computes until it is trained;
        the attention processors, FreeU's factors and train or eval mode are carried over for the same reason. A UNet
        that carries adapters (LoRA, IP-Adapter) is refused: they are loaded onto the DIA UNet instead.
        """
        if isinstance(unet, DIAModelMixin):
            raise ValueError(
                f"from_unet expects a stock {cls.stock_class.__name__}; this model already has DIA"
            )
        if not isinstance(unet, cls.stock_class):
            raise ValueError(
                f"{cls.__name__}.from_unet expects a {cls.stock_class.__name__}, got a {type(unet).__name__}"
            )
        unknown = sorted(set(dia_options) - set(DIA_ARGUMENTS))
        if unknown:
            raise ValueError(f"unknown DIA option(s) {unknown}; expected some of {DIA_ARGUMENTS}")
        if getattr(unet, "peft_config", None) or unet.config.get("encoder_hid_dim_type") == "ip_image_proj":
            raise ValueError(
                "the UNet carries adapters (LoRA or IP-Adapter), which change its modules; apply DIA first, then "
                "load the adapters onto the DIA UNet"
            )
        accepted = inspect.signature(cls.__init__).parameters
        config = {key: value for key, value in unet.config.items() if key in accepted}
        config.update({"dia_gate": "identity", **dia_options})
        model = cls(**config)
        model.retrofitted_from = unet.config.get("_name_or_path")  # the base model its card names
        carry_runtime_state(unet, model)
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
        """Loads a checkpoint of this class, or retrofits a stock checkpoint of `stock_class` through `from_unet`.

        DIA options (`dia_attention=...` etc.) may be given only for a stock checkpoint; a DIA checkpoint's options
        come from its config.
        """
        dia_options = {name: kwargs.pop(name) for name in DIA_ARGUMENTS if name in kwargs}
        config = cls.load_config(pretrained_model_name_or_path, **dict(kwargs))
        if config.get("_class_name") == cls.__name__:
            if dia_options:
                raise ValueError(
                    f"{sorted(dia_options)} cannot change a saved {cls.__name__}; its config sets them"
                )
            return super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        stock = cls.stock_class.from_pretrained(pretrained_model_name_or_path, **kwargs)
        return cls.from_unet(stock, **dia_options)

    def save_pretrained(
        self,
        save_directory,
        is_main_process: bool = True,
        save_function=None,
        safe_serialization: bool = True,
        variant: str | None = None,
        max_shard_size: int | str = "10GB",
        push_to_hub: bool = False,
        use_flashpack: bool = False,
        base_model: str | None = None,
        **kwargs,
    ) -> None:
        """diffusers' `save_pretrained` (same arguments; pipelines pass on those its signature names), plus a model
        card (README.md) that describes the weights beside it: the DIA options and their parameter cost, the base
        model of a retrofit (`base_model`, else what `from_unet` was given), the lines that load it. The card is
        written again on every save; a pipeline saved by a trainer has one card at its root instead
        (`pipeline_card_only`). With `push_to_hub=True` the folder goes up with this card (`repo_id`, `private`)."""
        repo_id, private = kwargs.pop("repo_id", None), kwargs.pop("private", None)
        super().save_pretrained(
            save_directory,
            is_main_process=is_main_process,
            save_function=save_function,
            safe_serialization=safe_serialization,
            variant=variant,
            max_shard_size=max_shard_size,
            use_flashpack=use_flashpack,
            **kwargs,
        )
        if not is_main_process or not (model_cards_wanted() or push_to_hub):
            return
        source = repo_id or str(save_directory)
        base_model = base_model or getattr(self, "retrofitted_from", None)
        facts = model_facts(self, model_card_task(self), source, base_model=base_model)
        write_model_card(save_directory, facts)
        if push_to_hub:
            repo_id = hub_repo_id(save_directory, repo_id)
            push_folder(save_directory, repo_id, bool(private), ["*"], f"Upload {type(self).__name__}")
