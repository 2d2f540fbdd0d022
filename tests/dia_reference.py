"""The DIA method's formulas written out by hand, for the tests to compare the modules against.

DIA-LSTM (DIANet): gates = W_x(s) + W_h(h) split as i, f, g, o; c' = σ(f)·c + σ(i)·tanh(g); h' = σ(o)·σ(c'), where
W_x and W_h are Linear(C, C/r) -> ReLU -> Linear(C/r, 4C). SE: σ(W2·ReLU(W1·s)).
"""

import torch

from dia_diffusion.models.dia_cell import DIALSTMCell


def affine(x: torch.Tensor, layer: torch.nn.Linear) -> torch.Tensor:
    return x @ layer.weight.T + layer.bias


def reference_bottleneck(x: torch.Tensor, squeeze: torch.nn.Linear, expand: torch.nn.Linear) -> torch.Tensor:
    return affine(torch.clamp(affine(x, squeeze), min=0), expand)


def reference_dia_lstm_step(cell: DIALSTMCell, pooled, hidden, memory):
    """One step of the paper's cell, every gate written out in the order i, f, g, o."""
    channels = pooled.shape[1]
    gates = reference_bottleneck(pooled, cell.input_map[0], cell.input_map[2])
    if cell.hidden_map is not None:
        gates = gates + reference_bottleneck(hidden, cell.hidden_map[0], cell.hidden_map[2])
    input_gate = gates[:, :channels]
    forget_gate = gates[:, channels : 2 * channels]
    candidate = gates[:, 2 * channels : 3 * channels]
    output_gate = gates[:, 3 * channels :]
    new_memory = torch.sigmoid(forget_gate) * memory + torch.sigmoid(input_gate) * torch.tanh(candidate)
    # The paper's output: sigmoid of the cell, not tanh, so that h' is an attention in (0, 1).
    new_hidden = torch.sigmoid(output_gate) * torch.sigmoid(new_memory)
    return new_hidden, new_memory


def randomised(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """float64 (so the comparison can be tight) and every parameter drawn at unit scale, so that no gate sits in a
    flat region of its nonlinearity, every unit of the bottlenecks is alive for some sample, and gains are non-zero."""
    generator = torch.Generator().manual_seed(seed)
    module = module.double()
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator, dtype=torch.float64))
    return module
