"""CPU kernels for dropout and attention in training (filled into `dsexit.model.kernels` by
`dsexit.cpu.tune_process`). Both fall back to torch's own kernels off the CPU.

Dropout: torch draws a CPU dropout mask with one Mersenne-Twister call and a float compare per
element (`bernoulli_`). Here each 64-bit word of a PCG64 stream, seeded by one draw of torch's
default generator (so masks follow `torch.manual_seed` and the checkpointed generator state),
gives four 16-bit values; an element is dropped when its value is below round(p * 2^16), and the
kept ones are scaled by 1 / (1 - that fraction): the drop rate is p rounded to a multiple of
2^-16. The mask kept for the backward is in the inputs' dtype (`_MaskedScale`).

Attention in training: SDPA's CPU kernel with dropout is its math path with a `bernoulli_` mask;
`cpu_attention` takes the same steps with `cpu_dropout`'s mask (softmax in fp32, as SDPA's own
kernels), the scale and the key mask riding on the scores' matmul.

Measured effects: docs/cpu.md and bench/README.md. `numpy` and the data-dependent word count keep
these kernels out of a compiled graph, which is why they are not the model's defaults.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

_DRAW_LEVELS = 1 << 16  # a CPU dropout draw is 16 random bits


class _MaskedScale(torch.autograd.Function):
    """`inputs * mask * scale`, whose backward applies the same mask and scale. The mask is 0 or 1
    in the inputs' dtype (a float times a bool mask takes torch's slower mixed-dtype path); in fp32
    the scale is folded into it, so forward and backward are one pass each."""

    @staticmethod
    def forward(ctx, inputs: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
        if inputs.dtype in (torch.float32, torch.float64):
            mask, scale = mask.mul_(scale), 1.0  # bf16 would round the scale by up to 0.4%
        ctx.save_for_backward(mask)
        ctx.scale = scale
        # No gradient in, none out (as torch's own ops): not a tensor of zeros that would set every
        # node upstream computing on zeros.
        ctx.set_materialize_grads(False)
        return inputs.mul(mask) if scale == 1.0 else inputs.mul(mask).mul_(scale)

    @staticmethod
    def backward(ctx, grad: torch.Tensor | None):
        if grad is None:
            return None, None, None
        (mask,) = ctx.saved_tensors
        return (grad.mul(mask) if ctx.scale == 1.0 else grad.mul(mask).mul_(ctx.scale)), None, None


def _random_words(count: int) -> torch.Tensor:
    """`count` uniform 64-bit integers from a PCG64 stream seeded by one draw of torch's default generator."""
    seed = int(torch.randint(2**62, ()))
    return torch.from_numpy(np.random.PCG64(seed).random_raw(count).view(np.int64))


def cpu_dropout(inputs: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """`F.dropout`, with the cheaper mask on CPU tensors (see the module docstring)."""
    if not training or p == 0.0:
        return inputs
    if inputs.device.type != "cpu" or p >= 1.0:
        return F.dropout(inputs, p, training=True)
    if inputs.numel() == 0:
        # Still the one draw every call takes: the random stream (masks, replacements, later
        # dropout) then does not depend on how many tokens are active, so a run whose tokens all
        # left a layer stays on the stream of a run without exits (paired arms of a seed).
        _random_words(0)
        return F.dropout(inputs, p, training=True)
    dropped_levels = round(p * _DRAW_LEVELS)
    words = _random_words((inputs.numel() + 3) // 4)
    draws = words.view(torch.int16)[: inputs.numel()].view(inputs.shape)  # uniform on [-2^15, 2^15)
    mask = torch.empty(inputs.shape, dtype=inputs.dtype)
    torch.ge(draws, dropped_levels - _DRAW_LEVELS // 2, out=mask)  # 1 where kept, 0 where dropped
    return _MaskedScale.apply(inputs, mask, _DRAW_LEVELS / (_DRAW_LEVELS - dropped_levels))


def cpu_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, key_mask: torch.Tensor | None, dropout_p: float
) -> torch.Tensor:
    """SDPA's result ([B, heads, L, d]); with dropout on a CPU, its math path with `cpu_dropout`'s mask."""
    if not dropout_p or query.device.type != "cpu":
        return F.scaled_dot_product_attention(query, key, value, attn_mask=key_mask, dropout_p=dropout_p)
    batch, heads, length, head_size = query.shape
    keys = key.shape[2]
    scale = 1.0 / math.sqrt(head_size)
    query = query.reshape(batch * heads, length, head_size)
    key = key.reshape(batch * heads, keys, head_size).transpose(1, 2)
    if key_mask is None:
        scores = torch.bmm(query, key).mul_(scale)
    else:
        # The key mask as an additive bias on the scores' matmul: no separate pass over the scores.
        key_bias = query.new_zeros(key_mask.shape).masked_fill_(~key_mask, float("-inf"))
        key_bias = key_bias.expand(batch, heads, 1, keys).reshape(batch * heads, 1, keys)
        scores = torch.baddbmm(key_bias, query, key, alpha=scale)
    probs = cpu_dropout(scores.float().softmax(-1).to(query.dtype), dropout_p, True)
    context = torch.bmm(probs, value.reshape(batch * heads, keys, head_size))
    return context.view(batch, heads, length, head_size)
