"""DIA inside diffusers' resnets: how one shared channel-attention module reaches every `ResnetBlock2D` of a UNet
while the UNet runs diffusers' own forward.

DIA (Dense-and-Implicit Attention) shares one attention module across layers, and its LSTM state carries each
layer's attention to the next. In a diffusers UNet the layers are the `ResnetBlock2D`s, which the blocks call as
`resnet(hidden_states, temb)` (or through the blocks' gradient-checkpointing function). Three pieces make DIA work
there without re-implementing any block or UNet forward:

- `DIAResnetBlock2D`: the stock resnet with the channel attention on its residual branch, after `conv2` and before
  the shortcut add (DIANet's placement). A model's resnets become DIA resnets by a class swap, so their module names
  and state-dict keys stay the stock ones: stock checkpoints and LoRA files that target `conv1`, `conv2` or
  `time_emb_proj` load unchanged.
- `DIACall`: what one forward call of the model carries from resnet to resnet (each cell's state, the projected
  embedding, the next site). The model owns it and starts it afresh at every call; the resnets read and write it.
- The split between the two: a DIA resnet's `dia_step` is a pure function `(x, temb, h, c, condition) -> (out, h',
  c')`; only it is ever checkpointed, and the state is read and written outside it. Gradient checkpointing re-runs
  the step during backward with the state it saw the first time, which is what makes gradients exact under
  reentrant and non-reentrant checkpointing, with several forwards before one backward, and under
  `torch.compile(fullgraph=True)`. (Hooks were not used: a `deepcopy` of a hooked module, as EMA makes, keeps running
  the original module's weights.)

`DIAModelMixin` (`dia_model.py`) is what a UNet class adds to use them. One model instance runs one forward call at a
time (the recurrent state is the call's): threads that share a model must not call it at once.
"""

import torch
from diffusers.models.resnet import ResnetBlock2D

from dia_diffusion.models.channel_attention import ChannelAttention


class DIACall:
    """The DIA state of one forward call of a model: shared by all its resnets, reset by the model at every call.

    `attention` is the model's `ChannelAttention`, reached from here so that the resnets need no reference to the
    model; `states` maps each cell key to its `(h, c)`; `condition` is the projected embedding, computed by the first
    resnet (from the `temb` every resnet receives) and reused by the others; `next_site` checks that the resnets run
    in the order the sites were numbered.
    """

    def __init__(self, attention: ChannelAttention) -> None:
        self.attention = attention
        self.reset()

    def reset(self) -> None:
        self.states: dict[str, tuple] = {}
        self.condition: torch.Tensor | None = None
        self.next_site = 0


class CheckpointDIAResnetsInside:
    """The checkpoint function the blocks get: a DIA resnet is called unwrapped (it checkpoints its own pure step
    with the same function); anything else the block checkpoints goes through the function as before."""

    def __init__(self, checkpoint) -> None:
        self.checkpoint = checkpoint

    def __call__(self, function, *args, **kwargs):
        if isinstance(function, DIAResnetBlock2D):
            return function(*args, **kwargs)
        return self.checkpoint(function, *args, **kwargs)


class DIAResnetBlock2D(ResnetBlock2D):
    """A `ResnetBlock2D` whose residual branch is gated by the model's shared channel attention.

    Never constructed directly: `DIAModelMixin.install_dia` (`dia_model.py`) swaps a built resnet's class and sets
    `dia_call` (the model's `DIACall`), `dia_site` (its position in execution order) and `dia_checkpoint` (the
    checkpoint function, None when gradient checkpointing is off).
    """

    dia_call: DIACall
    dia_site: int
    dia_checkpoint = None

    def forward(self, input_tensor: torch.Tensor, temb: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        call = self.dia_call
        if call.next_site != self.dia_site:
            raise RuntimeError(
                f"DIA resnet {self.dia_site} ran when resnet {call.next_site} was due: the blocks ran their resnets "
                "in an order the DIA sites were not numbered in"
            )
        call.next_site += 1
        if call.condition is None and call.attention.condition_projection is not None:
            call.condition = call.attention.project_condition(temb)
        key = call.attention.site_cells[self.dia_site]
        hidden, cell = call.states.get(key, (None, None))
        if self.dia_checkpoint is not None and torch.is_grad_enabled():
            output, hidden, cell = self.dia_checkpoint(
                self.dia_step, input_tensor, temb, hidden, cell, call.condition
            )
        else:
            output, hidden, cell = self.dia_step(input_tensor, temb, hidden, cell, call.condition)
        call.states[key] = (hidden, cell)
        return output

    def dia_step(self, input_tensor, temb, hidden, cell, condition):
        # Adapted from diffusers ResnetBlock2D.forward (diffusers 0.42.1), with the channel attention inserted on the
        # residual branch after conv2, before the shortcut add and output_scale_factor. The identity-gate parity tests
        # (tests/test_dia_parity.py) compare it with the stock forward, so a change there shows up as a failure.
        hidden_states = self.nonlinearity(self.norm1(input_tensor))
        if self.upsample is not None:
            if hidden_states.shape[0] >= 64:
                input_tensor = input_tensor.contiguous()
                hidden_states = hidden_states.contiguous()
            input_tensor = self.upsample(input_tensor)
            hidden_states = self.upsample(hidden_states)
        elif self.downsample is not None:
            input_tensor = self.downsample(input_tensor)
            hidden_states = self.downsample(hidden_states)
        hidden_states = self.conv1(hidden_states)

        if self.time_emb_proj is not None:
            if not self.skip_time_act:
                temb = self.nonlinearity(temb)
            temb = self.time_emb_proj(temb)[:, :, None, None]
        if self.time_embedding_norm == "default":
            if temb is not None:
                hidden_states = hidden_states + temb
            hidden_states = self.norm2(hidden_states)
        else:
            time_scale, time_shift = torch.chunk(temb, 2, dim=1)
            hidden_states = self.norm2(hidden_states) * (1 + time_scale) + time_shift
        hidden_states = self.conv2(self.dropout(self.nonlinearity(hidden_states)))

        state = None if hidden is None else (hidden, cell)
        hidden_states, state = self.dia_call.attention(hidden_states, self.dia_site, state, condition)
        hidden, cell = (None, None) if state is None else state

        if self.conv_shortcut is not None:
            if self.training:
                input_tensor = input_tensor.contiguous()
            input_tensor = self.conv_shortcut(input_tensor)
        return (input_tensor + hidden_states) / self.output_scale_factor, hidden, cell
