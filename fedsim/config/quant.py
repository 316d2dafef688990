"""What the quantization backends can do, checked while a scenario is validated (before torch is imported): the bits
each backend stores, the default backend per bit width, block and group sizes that fit the layers."""

from __future__ import annotations

from fedsim.errors import ScenarioError
from fedsim.types import QuantSpec

BACKEND_BITS = {"hqq": (1, 2, 3, 4, 8), "bnb": (4, 8), "none": (16, 32)}
ALLOWED_BITS = (1, 2, 3, 4, 8, 16, 32)
BNB_BLOCKSIZES = (64, 128, 256, 512, 1024, 2048, 4096)


def default_backend(bits: int) -> str:
    """bitsandbytes NF4 for 4 bits (QLoRA's format); HQQ for 1–3 bits (bitsandbytes has none) and for 8 bits; none
    above. 8-bit goes to HQQ because bitsandbytes' int8 layers compute differently depending on what they computed
    before (measured on CPU: a forward pass on other data shifts the next client's training loss by ~1e-3), so the
    same scenario would not give the same numbers on a different worker; ``backend: bnb`` still selects it."""
    return "hqq" if bits <= 3 or bits == 8 else "bnb" if bits == 4 else "none"


def check_spec(spec: QuantSpec, where: str = "clients.quant") -> None:
    """Raise a :class:`ScenarioError` for bits a backend cannot do or bad group sizes (shape checks are separate)."""
    if spec.bits not in ALLOWED_BITS:
        raise ScenarioError(where, f"bits must be one of {list(ALLOWED_BITS)}, got {spec.bits}",
                            "use 2, 3 or 4 for aggressive quantization, 8 for near-lossless, 16/32 for none")
    if spec.backend not in BACKEND_BITS:
        raise ScenarioError(where, f"unknown quantization backend {spec.backend!r}", "use hqq, bnb or none")
    if spec.bits not in BACKEND_BITS[spec.backend]:
        fix = {"bnb": "use backend: hqq, which does 1, 2, 3, 4 and 8 bits",
               "hqq": "use bits 16/32 with backend: none (or leave backend unset)",
               "none": "use backend: hqq (1-8 bits) or bnb (4, 8 bits) to quantize"}[spec.backend]
        raise ScenarioError(where, f"backend {spec.backend!r} cannot do {spec.bits}-bit "
                            f"(it does {', '.join(map(str, BACKEND_BITS[spec.backend]))})", fix)
    if spec.backend == "hqq" and (spec.group_size < 8 or spec.group_size % 8):
        raise ScenarioError(where, f"HQQ group_size must be a multiple of 8, got {spec.group_size}", "e.g. 64")
    if spec.backend == "bnb" and spec.bits == 4 and spec.blocksize not in BNB_BLOCKSIZES:
        raise ScenarioError(where, f"bitsandbytes 4-bit blocksize must be one of {list(BNB_BLOCKSIZES)}, "
                            f"got {spec.blocksize}", "e.g. 64")
    if spec.quant_type not in ("nf4", "fp4"):
        raise ScenarioError(where, f"quant_type must be nf4 or fp4, got {spec.quant_type!r}")


def check_shapes(spec: QuantSpec, shapes: dict[str, tuple[int, int]], where: str = "clients.quant") -> None:
    """Every quantized layer (d_out, d_in) must split into whole groups."""
    if spec.backend != "hqq" and not (spec.backend == "bnb" and spec.bits == 4):
        return
    for name, (d_out, d_in) in shapes.items():
        if spec.backend == "hqq" and d_in % spec.group_size:
            raise ScenarioError(where, f"group_size {spec.group_size} does not divide layer {name} "
                                f"({d_out}×{d_in}: input dimension {d_in})",
                                "choose a group size that divides every layer's input dimension, e.g. 32 or 64")
        if spec.backend == "bnb" and (d_out * d_in) % spec.blocksize:
            raise ScenarioError(where, f"blocksize {spec.blocksize} does not divide layer {name} ({d_out}×{d_in})",
                                "choose a smaller bitsandbytes blocksize, e.g. 64")
