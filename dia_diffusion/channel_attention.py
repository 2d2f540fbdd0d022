"""All channel-attention parameters of a DIA UNet, owned once and routed to the resnets at call time.

The UNet's resnets never hold a reference to these modules: a module registered under several parents makes
`save_pretrained` (safetensors) fail with "Some tensors share memory". Instead the UNet owns one `ChannelAttention`
and calls it with the index of the resnet ("site") being run and that site's recurrent state.

Sharing modes (which sites use the same cell):
- `global`: ONE cell for the whole UNet. Widths differ between levels (e.g. 128 and 256), so the cell runs at a fixed
  width and every width gets a small input adapter (C -> H) and output adapter (H -> C).
- `per_width`: one cell per distinct channel width, closest to the per-stage cells of the authors' ResNets.
- `per_block`: one cell per down/mid/up block, so the state restarts at every block.
"""

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn

from dia_diffusion.dia_cell import DIALSTMCell, SqueezeExciteCell

ATTENTION_KINDS = ("dia_lstm", "se_shared", "se_per_layer", "none")
SHARING_MODES = ("global", "per_width", "per_block")
GATES = ("sigmoid", "identity")


@dataclass(frozen=True)
class ResnetSite:
    """One resnet of the UNet, in forward-execution order: the block that holds it and its branch width."""

    block: int
    channels: int


class ChannelAttention(nn.Module):
    """Channel attention for every resnet branch of a UNet, with its parameters owned exactly once.

    `forward(branch, site, state)` returns the gated branch and the state to hand to the next site that uses the
    same cell. Gates:
    - `sigmoid`: the paper's `branch * a` with `a` in (0, 1).
    - `identity`: `branch * (1 + g * (a - 1/2))` with a per-channel gain `g` initialised to zero, so a retrofitted
      pretrained UNet computes exactly what it computed before, until training moves `g`.
    """

    def __init__(
        self,
        sites: Sequence[ResnetSite],
        attention: str = "dia_lstm",
        sharing: str = "global",
        reduction: int = 4,
        hidden_channels: int | None = None,
        gate: str = "sigmoid",
    ):
        super().__init__()
        if attention not in ATTENTION_KINDS or attention == "none":
            raise ValueError(f"attention must be one of {ATTENTION_KINDS[:-1]}, got {attention!r}")
        self.gate = gate
        widths = sorted({site.channels for site in sites})
        self.uses_adapters = attention != "se_per_layer" and sharing == "global"
        # Per-layer SE is the "one module per layer" design the paper argues against; sharing does not apply to it.
        if attention == "se_per_layer":
            cell_keys = [f"layer{index}" for index in range(len(sites))]
        elif sharing == "global":
            cell_keys = ["shared"] * len(sites)
        elif sharing == "per_width":
            cell_keys = [f"width{site.channels}" for site in sites]
        else:
            cell_keys = [f"block{site.block}" for site in sites]
        self.site_cells = tuple(cell_keys)
        self.site_widths = tuple(f"width{site.channels}" for site in sites)

        cell_class = DIALSTMCell if attention == "dia_lstm" else SqueezeExciteCell
        cell_widths: dict[str, int] = {}
        for key, site in zip(cell_keys, sites):
            cell_widths[key] = (hidden_channels or widths[0]) if self.uses_adapters else site.channels
        self.cells = nn.ModuleDict(
            {
                key: cell_class(width, reduction, recurrent=cell_keys.count(key) > 1)
                for key, width in cell_widths.items()
            }
        )

        if self.uses_adapters:
            hidden = cell_widths["shared"]
            self.input_adapters = nn.ModuleDict({f"width{w}": nn.Linear(w, hidden) for w in widths})
            self.output_adapters = nn.ModuleDict({f"width{w}": nn.Linear(hidden, w) for w in widths})

        if gate == "identity":
            # One gain vector per cell, or per width for the global cell, so that the count stays independent of
            # depth in the shared modes.
            self.site_gains = self.site_widths if self.uses_adapters else self.site_cells
            gain_widths = dict(zip(self.site_gains, (site.channels for site in sites)))
            self.gains = nn.ParameterDict(
                {key: nn.Parameter(torch.zeros(w)) for key, w in gain_widths.items()}
            )

    def attention(self, branch: torch.Tensor, site: int, state):
        """The channel attention `a` in (0, 1) for one resnet's branch [B, C, H, W], and the state after it."""
        pooled = branch.mean(dim=(2, 3))
        if self.uses_adapters:
            pooled = self.input_adapters[self.site_widths[site]](pooled)
        attention, state = self.cells[self.site_cells[site]](pooled, state)
        if self.uses_adapters:
            attention = torch.sigmoid(self.output_adapters[self.site_widths[site]](attention))
        return attention, state

    def forward(self, branch: torch.Tensor, site: int, state):
        attention, state = self.attention(branch, site, state)
        if self.gate == "identity":
            attention = 1 + self.gains[self.site_gains[site]] * (attention - 0.5)
        return branch * attention[:, :, None, None].to(branch.dtype), state
