"""Quantized copies of the base model: HQQ (1/2/3/4/8 bits), bitsandbytes (4-bit NF4/FP4, 8-bit) and 16-bit.

A :class:`QuantSpec` names one way of storing the base: bits, backend, group size and, for bitsandbytes 4-bit, the
4-bit type. :func:`quantize_model` turns a deep copy of the full-precision base into that variant, replacing every
``nn.Linear`` inside the decoder layers (QLoRA's choice: embeddings, norms and the LM head stay in full precision);
PEFT then attaches LoRA to the quantized layers with its own HQQ / bitsandbytes LoRA layers.

16 bits means the weights are rounded to bfloat16 and kept in the compute dtype (on CPU, bf16 arithmetic is ~100×
slower than fp32; the rounding is what differs). On CPU, quantized layers dequantize and then multiply: they simulate
the error, not the memory saving, so memory is reported from the packed sizes (:func:`packed_bytes`).

The backends are optional extras (``pip install 'fedsim[hqq]'`` / ``'fedsim[bnb]'``); a missing one is a
:class:`~fedsim.errors.ScenarioError` naming the extra.
"""

from __future__ import annotations

import copy
import logging

import torch

from fedsim.boot import BACKEND_MODULES, skip_unused_backends  # noqa: F401  # re-exported
from fedsim.config.quant import (  # noqa: F401  # re-exported: the public names of quantization
    ALLOWED_BITS,
    BACKEND_BITS,
    BNB_BLOCKSIZES,
    check_shapes,
    check_spec,
    default_backend,
)
from fedsim.errors import ScenarioError
from fedsim.models.base import in_blocks, is_linear, weight_matrix
from fedsim.types import FULL, QuantSpec  # noqa: F401


def require_backend(backend: str) -> None:
    """Import check with the extra to install."""
    try:
        if backend == "hqq":
            import hqq.core.quantize  # noqa: F401
        elif backend == "bnb":
            import bitsandbytes  # noqa: F401
    except ImportError:
        raise ScenarioError("clients.quant", f"the {backend} quantization backend is not installed",
                            f"pip install 'fedsim[{backend}]'") from None


def quantizable_layers(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The linear layers (``nn.Linear`` or GPT-2's ``Conv1D``) inside the model's blocks (not the embeddings, the LM
    head or a classifier)."""
    return {name: mod for name, mod in model.named_modules() if is_linear(mod) and in_blocks(name)}


def as_linear(layer: torch.nn.Module) -> torch.nn.Linear:
    """An ``nn.Linear`` computing what ``layer`` computes: itself, or a ``Conv1D``'s weight transposed (the quantized
    layers of both backends are built from an ``nn.Linear``, as transformers' own quantizers convert GPT-2's)."""
    if isinstance(layer, torch.nn.Linear):
        return layer
    d_in, d_out = layer.weight.shape
    lin = torch.nn.Linear(d_in, d_out, bias=layer.bias is not None, device="meta")
    lin.weight = torch.nn.Parameter(layer.weight.detach().t().contiguous(), requires_grad=False)
    if layer.bias is not None:
        lin.bias = torch.nn.Parameter(layer.bias.detach().clone(), requires_grad=False)
    return lin


def _hqq_layer(linear: torch.nn.Linear, spec: QuantSpec, compute_dtype: torch.dtype, device: torch.device):
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

    cfg = BaseQuantizeConfig(nbits=spec.bits, group_size=spec.group_size, axis=1)
    return HQQLinear(linear, cfg, del_orig=True, compute_dtype=compute_dtype, device=str(device))


def _bnb_layer(linear: torch.nn.Linear, spec: QuantSpec, compute_dtype: torch.dtype, device: torch.device):
    import bitsandbytes as bnb

    # its int8 matmul logs "inputs will be cast to float16" on every call
    logging.getLogger("bitsandbytes.autograd._functions").setLevel(logging.ERROR)

    w = linear.weight.data.to(torch.float32 if device.type == "cpu" else compute_dtype)
    bias = linear.bias is not None
    if spec.bits == 4:
        layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=bias, compute_dtype=compute_dtype,
                                  quant_type=spec.quant_type, device="meta")
        layer.weight = bnb.nn.Params4bit(w.cpu(), requires_grad=False, quant_type=spec.quant_type,
                                         blocksize=spec.blocksize)
        # bitsandbytes ≥ 0.50 repacks 4-bit weights for an AVX512-bf16 CPU kernel on the first no-grad eval-mode
        # call: it fails for layers narrower than the block (e.g. 32 < 64) and would compute evaluation with another
        # kernel than training (a client's numbers would then depend on what the layer ran before). One kernel.
        layer.support_avx512bf16_for_cpu = False
    else:
        layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=bias, has_fp16_weights=False,
                                    device="meta")
        layer.weight = bnb.nn.Int8Params(w.cpu(), requires_grad=False, has_fp16_weights=False)
    if bias:
        layer.bias = torch.nn.Parameter(linear.bias.data.to(compute_dtype).cpu(), requires_grad=False)
    layer = layer.to(device)  # moving the parameters is what quantizes them
    return layer


def quantize_model(base: torch.nn.Module, spec: QuantSpec, device: torch.device,
                   compute_dtype: torch.dtype) -> torch.nn.Module:
    """A quantized deep copy of ``base`` (which is not modified), frozen, in eval mode, on ``device``."""
    model = copy.deepcopy(base)
    if spec.bits == 32:
        return model.to(device)
    if spec.bits == 16:
        with torch.no_grad():
            for lin in quantizable_layers(model).values():
                lin.weight.copy_(lin.weight.to(torch.bfloat16).to(lin.weight.dtype))  # either orientation
        return model.to(device)
    require_backend(spec.backend)
    make = _hqq_layer if spec.backend == "hqq" else _bnb_layer
    for name, lin in quantizable_layers(model).items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, make(as_linear(lin), spec, compute_dtype, device))
    model = model.to(device) if spec.backend != "bnb" else _move_rest(model, device)
    model.requires_grad_(False)
    model.eval()
    return model


def _move_rest(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Move the non-quantized parameters (bitsandbytes layers are already where they belong)."""
    for mod in model.modules():
        if type(mod).__module__.startswith("bitsandbytes"):
            continue
        for name, p in list(mod.named_parameters(recurse=False)):
            if p.device != device:
                setattr(mod, name, torch.nn.Parameter(p.data.to(device), requires_grad=False))
        for name, b in list(mod.named_buffers(recurse=False)):
            if b.device != device:
                mod._buffers[name] = b.to(device)
    return model


def dequantized_weight(layer: torch.nn.Module) -> torch.Tensor:
    """The weight a (possibly quantized, possibly PEFT-wrapped) linear layer computes with, float32 (d_out, d_in)."""
    layer = getattr(layer, "base_layer", layer)
    if type(layer).__name__ == "HQQLinear":
        return layer.dequantize().float()
    if type(layer).__name__ == "Linear4bit":
        import bitsandbytes as bnb

        return bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
    if type(layer).__name__ == "Linear8bitLt":
        w = layer.weight
        scb = w.SCB if getattr(w, "SCB", None) is not None else layer.state.SCB  # moved there by a forward pass
        return w.data.float() * scb.float().unsqueeze(1) / 127.0
    return weight_matrix(layer).detach().float()


def quantize_weight(weight: torch.Tensor, spec: QuantSpec, compute_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """deq(q(W)) for one weight matrix (d_out, d_in), float32 on the weight's device."""
    lin = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    lin.weight = torch.nn.Parameter(weight.detach().clone(), requires_grad=False)
    holder = torch.nn.Module()
    holder.layers = torch.nn.ModuleList([torch.nn.Module()])
    holder.layers[0].proj = lin
    q = quantize_model(holder, spec, weight.device, compute_dtype)
    return dequantized_weight(q.layers[0].proj)


def packed_bytes(model: torch.nn.Module, spec: QuantSpec = FULL) -> int:
    """Bytes the model's weights take as stored: packed quantized codes plus their scales/zeros, other parameters
    at their dtype (what a device holding this variant needs for the base, not counting activations). 16-bit layers
    count 2 bytes per weight whatever dtype simulates them."""
    total = 0
    seen: set[int] = set()
    if spec.bits == 16:
        for lin in quantizable_layers(model).values():
            total += 2 * lin.weight.numel()
            seen.add(id(lin.weight))
    for mod in model.modules():
        if type(mod).__name__ == "HQQLinear":
            total += mod.W_q.numel() * mod.W_q.element_size()
            for k in ("scale", "zero"):
                t = mod.meta.get(k)
                if torch.is_tensor(t):
                    total += t.numel() * t.element_size()
            if mod.bias is not None:
                total += mod.bias.numel() * mod.bias.element_size()
            seen.update(id(p) for p in mod.parameters())
            continue
        for p in mod.parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            total += p.numel() * p.element_size()
            state = getattr(p, "quant_state", None)
            if state is not None:  # bitsandbytes 4-bit: one absmax per block (+ nested state)
                total += state.absmax.numel() * state.absmax.element_size()
            scb = getattr(p, "SCB", None)
            if scb is not None:  # bitsandbytes 8-bit: one scale per row
                total += scb.numel() * scb.element_size()
    return total
