"""The recurrent cells that turn a pooled feature vector into channel attention.

`DIALSTMCell` is the cell of Dense-and-Implicit Attention (DIA): one LSTM whose input-to-hidden and hidden-to-hidden
maps are squeeze-and-excitation style bottlenecks, and whose hidden state *is* the channel attention. Shared across
layers, its recurrent state carries every earlier layer's attention into the next one (the "dense and implicit"
connections of the paper). `SqueezeExciteCell` is the same interface without memory: the plain SE module that the
paper's ablations compare against.

Both cells map `(pooled [B, C], state) -> (attention [B, C] in (0, 1), new_state)`.
"""

import torch
import torch.nn as nn

LSTMState = tuple[torch.Tensor, torch.Tensor]


def bottleneck(in_features: int, hidden_features: int, out_features: int) -> nn.Sequential:
    """Linear -> ReLU -> Linear: the SE-style squeeze that keeps DIA's parameter count at ~10 C^2 / r."""
    return nn.Sequential(
        nn.Linear(in_features, hidden_features),
        nn.ReLU(inplace=True),
        nn.Linear(hidden_features, out_features),
    )


class DIALSTMCell(nn.Module):
    """The DIA-LSTM cell (DIANet): an LSTM cell of width `channels` with bottleneck gate maps and a sigmoid output.

    Differences from `torch.nn.LSTMCell`, both from the paper:
    - the input-to-hidden and hidden-to-hidden maps are `Linear(C, C/r) -> ReLU -> Linear(C/r, 4C)` instead of a
      single `Linear(C, 4C)`, which makes the cell cost about `10 C^2 / r + 8 C` parameters;
    - the output is `h' = sigmoid(o) * sigmoid(c')` instead of `sigmoid(o) * tanh(c')`, so that `h'` lies in (0, 1) and
      is used directly as the channel attention, with no extra head.

    A cell that serves a single layer (`recurrent=False`) only ever sees the zero state, so it has no hidden map.
    """

    def __init__(self, channels: int, reduction: int = 4, recurrent: bool = True):
        super().__init__()
        hidden = max(channels // reduction, 1)
        self.channels = channels
        self.input_map = bottleneck(channels, hidden, 4 * channels)
        self.hidden_map = bottleneck(channels, hidden, 4 * channels) if recurrent else None

    def forward(self, pooled: torch.Tensor, state: LSTMState | None) -> tuple[torch.Tensor, LSTMState]:
        if state is None:
            # The first layer of every forward pass starts from a zero state (built on the input's device and
            # dtype, so the cell runs on any backend and under autocast).
            hidden = cell = torch.zeros_like(pooled)
        else:
            hidden, cell = state
        gates = self.input_map(pooled)
        if self.hidden_map is not None:
            gates = gates + self.hidden_map(hidden)
        input_gate, forget_gate, candidate, output_gate = gates.chunk(4, dim=1)
        cell = torch.sigmoid(forget_gate) * cell + torch.sigmoid(input_gate) * torch.tanh(candidate)
        hidden = torch.sigmoid(output_gate) * torch.sigmoid(cell)
        return hidden, (hidden, cell)


class SqueezeExciteCell(nn.Module):
    """Squeeze-and-excitation without memory: `sigmoid(Linear(ReLU(Linear(pooled))))`. The state passes through."""

    def __init__(self, channels: int, reduction: int = 4, recurrent: bool = False):
        super().__init__()
        self.channels = channels
        self.excite = bottleneck(channels, max(channels // reduction, 1), channels)

    def forward(self, pooled: torch.Tensor, state: None) -> tuple[torch.Tensor, None]:
        return torch.sigmoid(self.excite(pooled)), state
