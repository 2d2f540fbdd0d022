"""The `dia_*` arguments that `DIAUNet2DModel` adds to `UNet2DModel`'s config, and their validation.

What each option does is described where it is implemented: `channel_attention.py` (attention kinds, sharing
modes, gates, conditioning, the global cell) and `dia_cell.py` (the cells).
"""

from dia_diffusion.models.channel_attention import (
    ATTENTION_KINDS,
    CONDITIONS,
    GATES,
    GLOBAL_CELLS,
    SHARING_MODES,
)

DIA_ARGUMENTS = (
    "dia_attention",
    "dia_sharing",
    "dia_reduction",
    "dia_hidden_channels",
    "dia_gate",
    "dia_condition",
    "dia_global_cell",
)


def check_dia_arguments(
    attention: str,
    sharing: str,
    reduction: int,
    hidden_channels: int | None,
    gate: str,
    condition: str = "none",
    global_cell: str = "bottleneck",
) -> None:
    """Raises a ValueError that names the first invalid DIA argument (by its config name, `dia_<argument>`)."""
    for name, value, choices in (
        ("dia_attention", attention, ATTENTION_KINDS),
        ("dia_sharing", sharing, SHARING_MODES),
        ("dia_gate", gate, GATES),
        ("dia_condition", condition, CONDITIONS),
        ("dia_global_cell", global_cell, GLOBAL_CELLS),
    ):
        if value not in choices:
            raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    if isinstance(reduction, bool) or not isinstance(reduction, int) or reduction < 1:
        raise ValueError(f"dia_reduction must be a positive integer, got {reduction!r}")
    if hidden_channels is not None and (
        isinstance(hidden_channels, bool) or not isinstance(hidden_channels, int) or hidden_channels < 1
    ):
        raise ValueError(f"dia_hidden_channels must be a positive integer or None, got {hidden_channels!r}")
    is_global_cell = sharing == "global" and attention in ("dia_lstm", "se_shared")
    for name, value, default in (
        ("dia_hidden_channels", hidden_channels, None),
        ("dia_global_cell", global_cell, "bottleneck"),
    ):
        if value != default and not is_global_cell:
            raise ValueError(
                f"{name} shapes the globally shared module; it needs dia_sharing='global' and dia_attention "
                f"'dia_lstm' or 'se_shared', got dia_sharing={sharing!r}, dia_attention={attention!r}"
            )
    if hidden_channels is not None and global_cell == "widest":
        raise ValueError(
            "dia_hidden_channels cannot be set with dia_global_cell='widest': that cell is as wide as the widest level"
        )
    if condition != "none" and attention == "none":
        raise ValueError(
            f"dia_condition={condition!r} conditions the channel attention; dia_attention='none' has none"
        )


def dia_options_of(
    dia_attention: str,
    dia_sharing: str,
    dia_reduction: int,
    dia_hidden_channels: int | None,
    dia_gate: str,
    dia_condition: str,
    dia_global_cell: str,
) -> dict:
    """A model's `dia_*` arguments, checked, as the options `ChannelAttention` takes (without the prefix)."""
    options = dict(
        attention=dia_attention,
        sharing=dia_sharing,
        reduction=dia_reduction,
        hidden_channels=dia_hidden_channels,
        gate=dia_gate,
        condition=dia_condition,
        global_cell=dia_global_cell,
    )
    check_dia_arguments(**options)
    return options
