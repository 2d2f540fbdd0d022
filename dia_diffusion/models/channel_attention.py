"""All channel-attention parameters of a DIA UNet, owned once and routed to the resnets at call time.

The UNet's resnets never hold a reference to these modules: a module registered under several parents makes
`save_pretrained` (safetensors) fail with "Some tensors share memory". Instead the UNet owns one `ChannelAttention`
and calls it with the index of the resnet ("site") being run and that site's recurrent state.

Sharing modes (which sites use the same cell):
- `global`: ONE cell for the whole UNet. Widths differ between levels (e.g. 128 and 256), and `global_cell` says how
  one cell serves them all:
  - `bottleneck`: the cell runs at a fixed width H (the narrowest by default); every width C gets an input adapter
    (C -> H) and an output adapter (H -> C) followed by a sigmoid, so the attention is a second sigmoid of the cell's
    output and the widest levels see the cell through an H-wide bottleneck.
  - `widest`: the cell runs at the widest width W; narrower widths C get only an input adapter (C -> W) and use the
    first C channels of the cell's output. The attention is the cell's own sigmoid output h' (the paper's eq.), and
    no level is squeezed below its own width.
- `per_width`: one cell per distinct channel width; its state flows through every resnet of that width, down -> mid
  -> up.
- `per_block`: one cell per down level, one for the mid block and one per up level, each starting from a zero state.
  This is the closest match to the per-stage cells of the authors' ResNets (one cell per stage, state reset at each
  stage); it differs only in that a UNet's up levels re-mix their channels with the skip connection, so an up
  "stage" is one level rather than all levels of one width.

Conditioning (`condition`): the one signal every layer of a diffusion UNet shares is the noise level. With
`timestep`, the UNet's time embedding is projected once per forward call (one projection owned here, at the widest
cell width; narrower cells use its first channels) and added to the cell's input at every site, so one shared cell
can produce different attention at different noise levels. The projection starts at zero, so a `timestep` model
starts out computing exactly what the `none` model computes and learns how much the noise level should matter
(the zero-initialised conditioning of DiT's adaLN-Zero).
"""

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from dia_diffusion.models.dia_cell import DIALSTMCell, SqueezeExciteCell

ATTENTION_KINDS = ("dia_lstm", "se_shared", "se_per_layer", "none")
SHARING_MODES = ("global", "per_width", "per_block")
GATES = ("sigmoid", "identity")
CONDITIONS = ("none", "timestep")
GLOBAL_CELLS = ("bottleneck", "widest")


@dataclass(frozen=True)
class ResnetSite:
    """One resnet of the UNet, in forward-execution order: the block that holds it and its branch width."""

    block: int
    channels: int


class ChannelAttention(nn.Module):
    """Channel attention for every resnet branch of a UNet, with its parameters owned exactly once.

    `forward(branch, site, state, condition)` returns the gated branch and the state to hand to the next site that
    uses the same cell; `condition` is `project_condition(temb)`, computed once per UNet call (None without
    conditioning). Gates:
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
        condition: str = "none",
        global_cell: str = "bottleneck",
        condition_channels: int | None = None,
    ):
        super().__init__()
        if attention not in ATTENTION_KINDS or attention == "none":
            raise ValueError(f"attention must be one of {ATTENTION_KINDS[:-1]}, got {attention!r}")
        if condition == "timestep" and not condition_channels:
            raise ValueError("condition='timestep' needs condition_channels, the width of the time embedding")
        self.gate = gate
        widths = sorted({site.channels for site in sites})
        self.uses_adapters = attention != "se_per_layer" and sharing == "global"
        # The attention is the cell's own output unless a bottleneck cell must be widened back by an output adapter.
        self.uses_output_adapters = self.uses_adapters and global_cell == "bottleneck"
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
        self.site_channels = tuple(site.channels for site in sites)

        if not self.uses_adapters:
            cell_width = None
        elif global_cell == "widest":
            cell_width = widths[-1]
        else:
            cell_width = hidden_channels or widths[0]
        cell_class = DIALSTMCell if attention == "dia_lstm" else SqueezeExciteCell
        cell_widths = {key: cell_width or site.channels for key, site in zip(cell_keys, sites)}
        self.cells = nn.ModuleDict(
            {
                key: cell_class(width, reduction, recurrent=cell_keys.count(key) > 1)
                for key, width in cell_widths.items()
            }
        )

        if self.uses_adapters:
            # A widest cell takes the widest level's pooled branch as it is.
            adapted = widths if self.uses_output_adapters else widths[:-1]
            self.input_adapters = nn.ModuleDict({f"width{w}": nn.Linear(w, cell_width) for w in adapted})
        if self.uses_output_adapters:
            self.output_adapters = nn.ModuleDict({f"width{w}": nn.Linear(cell_width, w) for w in widths})

        if condition == "timestep":
            self.condition_projection = nn.Linear(condition_channels, max(cell_widths.values()))
            nn.init.zeros_(self.condition_projection.weight)
            nn.init.zeros_(self.condition_projection.bias)
        else:
            self.condition_projection = None

        if gate == "identity":
            # One gain vector per cell, or per width for the global cell, so that the count stays independent of
            # depth in the shared modes.
            self.site_gains = self.site_widths if self.uses_adapters else self.site_cells
            gain_widths = dict(zip(self.site_gains, (site.channels for site in sites)))
            self.gains = nn.ParameterDict(
                {key: nn.Parameter(torch.zeros(w)) for key, w in gain_widths.items()}
            )

    def project_condition(self, temb: torch.Tensor) -> torch.Tensor | None:
        """The time embedding [B, T] as a cell input [B, widest cell width]; None without conditioning.

        SiLU first, as every resnet does before its own `time_emb_proj`."""
        if self.condition_projection is None:
            return None
        return self.condition_projection(F.silu(temb))

    def attention(self, branch: torch.Tensor, site: int, state, condition: torch.Tensor | None = None):
        """The channel attention `a` in (0, 1) for one resnet's branch [B, C, H, W], and the state after it."""
        pooled = branch.mean(dim=(2, 3))
        width = self.site_widths[site]
        if self.uses_adapters and width in self.input_adapters:
            pooled = self.input_adapters[width](pooled)
        if condition is not None:
            pooled = pooled + condition[:, : pooled.shape[1]]
        attention, state = self.cells[self.site_cells[site]](pooled, state)
        if self.uses_output_adapters:
            attention = torch.sigmoid(self.output_adapters[width](attention))
        elif self.uses_adapters:
            attention = attention[:, : self.site_channels[site]]
        return attention, state

    def forward(self, branch: torch.Tensor, site: int, state, condition: torch.Tensor | None = None):
        attention, state = self.attention(branch, site, state, condition)
        if self.gate == "identity":
            attention = 1 + self.gains[self.site_gains[site]] * (attention - 0.5)
        return branch * attention[:, :, None, None].to(branch.dtype), state
