"""Increments folded into a quantized base layer's own product (bitsandbytes 4-bit, and 8-bit while training on CPU).

bitsandbytes' 4-bit training matmul dequantizes the weight in the forward and again in the backward and runs a
dense product. An adapter that adds ``x @ ΔWᵀ`` beside ``base(x)`` pays two more products a step (forward, and the
input gradient). Here the layer dequantizes once itself into a fresh buffer, adds ΔW there (no copy: nobody else
holds the buffer) and runs one product; the backward does the same. Nothing weight-sized is kept from the forward
to the backward, as in bitsandbytes' own 4-bit matmul.

* ``fresh_weight(layer, x)``: the dequantizing callable of a base layer (``dtype -> fresh (out, in) tensor``), or
  None where the increment must stay beside the base product;
* ``compute_dtype(layer, x)``: the dtype the base layer computes in (4-bit: its ``compute_dtype``);
* ``dense_delta_linear``: the Function for dense increments (DPS, LayerSelect) on such a base; sparse increments use
  ``peft_sparse.kernels.sparse_delta_linear``, which takes the same callable.

8-bit (LLM.int8): bitsandbytes trains on CPU with ``MatMul8bitFp``, a dequantization (``CB · SCB / 127``) and a
float product; folding ΔW into that dequantized weight keeps its numerics, so training on CPU folds. In eval mode,
and on CUDA, the int8 product quantizes the activations too: a float product would change the layer's numerics,
so the increment stays beside ``base(x)`` there.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

#: Above this many tokens bitsandbytes' CUDA 4-bit product dequantizes and runs a dense matmul itself (bnb 0.50's
#: ``_gemm_4bit_custom_max_m``); below it, in inference, its fused kernel avoids the dequantization.
CUDA_DEQUANT_MIN_TOKENS = 1536


def _is_bnb_4bit(layer: nn.Module) -> bool:
    return type(layer).__name__ in ("Linear4bit", "LinearNF4", "LinearFP4") and hasattr(layer.weight, "quant_state")


def _is_bnb_8bit(layer: nn.Module) -> bool:
    return type(layer).__name__ == "Linear8bitLt" and hasattr(layer, "state")


def compute_dtype(layer: nn.Module, x: torch.Tensor) -> torch.dtype:
    """The dtype ``layer`` computes in for input ``x`` (bitsandbytes 4-bit: its ``compute_dtype``, set from the first
    input as bitsandbytes sets it)."""
    if _is_bnb_4bit(layer):
        if not layer.compute_type_is_set:
            layer.set_compute_type(x)
            layer.compute_type_is_set = True
        return layer.compute_dtype or x.dtype
    return x.dtype


def fresh_weight(layer: nn.Module, x: torch.Tensor) -> Optional[Callable[[torch.dtype], torch.Tensor]]:
    """A callable that dequantizes ``layer``'s weight into a new ``(out, in)`` tensor of the given dtype, when the
    increment should be folded into the layer's product for input ``x``; None when it should run beside it."""
    if _is_bnb_4bit(layer):
        if x.is_cuda and not torch.is_grad_enabled() and x.numel() // x.shape[-1] <= CUDA_DEQUANT_MIN_TOKENS:
            return None  # bitsandbytes' fused inference kernel never dequantizes: keep it
        from bitsandbytes.nn.modules import fix_4bit_weight_quant_state_from_module

        fix_4bit_weight_quant_state_from_module(layer)
        return lambda dtype: dequantize_4bit(layer.weight, dtype)
    if _is_bnb_8bit(layer) and layer.training and x.device.type in ("cpu", "xpu"):
        if layer.weight.CB is not None:  # as Linear8bitLt.forward does before its product
            layer.init_8bit_state()
        state = layer.state
        if state.CB is None or state.SCB is None or state.has_fp16_weights:
            return None
        return lambda dtype: state.CB.to(dtype).mul_(state.SCB.unsqueeze(1).mul(1.0 / 127.0))
    return None


def dequantize_4bit(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A bitsandbytes 4-bit weight (NF4 or FP4, with or without double quantization) dequantized straight into a new
    ``(out, in)`` tensor of ``dtype``, as bitsandbytes' own 4-bit product does (one pass, no cast copy)."""
    import bitsandbytes.functional as bnb_functional

    state = weight.quant_state
    absmax = state.absmax
    if state.nested:
        absmax = bnb_functional.dequantize_blockwise(state.absmax, state.state2) + state.offset
        absmax = absmax.float()
    return torch.ops.bitsandbytes.dequantize_4bit.default(
        weight.view(-1, 1), absmax, state.blocksize, state.quant_type, state.shape, dtype
    )


class DenseDeltaLinear(torch.autograd.Function):
    """``y = x @ (dequant(W) + ΔW)ᵀ + b`` with a dense trainable ΔW: one dequantization in the forward and one in the
    backward, ΔW added into the fresh buffer; ``ΔW``'s gradient is the dense weight gradient it needs anyway."""

    @staticmethod
    def forward(ctx, x, delta, fresh, bias):
        ctx.fresh = fresh
        ctx.save_for_backward(x, delta)
        weight = fresh(x.dtype)
        weight += delta.to(x.dtype)
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out):
        x, delta = ctx.saved_tensors
        grad_x = grad_delta = grad_bias = None
        grad_2d = grad_out.reshape(-1, grad_out.shape[-1])
        if ctx.needs_input_grad[0]:
            weight = ctx.fresh(grad_out.dtype)
            weight += delta.to(grad_out.dtype)
            grad_x = (grad_2d @ weight).view(x.shape)
        if ctx.needs_input_grad[1]:
            grad_delta = (grad_2d.T @ x.reshape(-1, x.shape[-1]).to(grad_2d.dtype)).to(delta.dtype)
        if ctx.needs_input_grad[3]:
            grad_bias = grad_2d.sum(0)
        return grad_x, grad_delta, None, grad_bias


def dense_delta_linear(
    x: torch.Tensor, delta: torch.Tensor, fresh: Callable[[torch.dtype], torch.Tensor], bias: Optional[torch.Tensor]
) -> torch.Tensor:
    """``F.linear(x, dequant(W) + delta, bias)`` through ``DenseDeltaLinear`` (``fresh``: see ``fresh_weight``)."""
    return DenseDeltaLinear.apply(x, delta, fresh, bias)
