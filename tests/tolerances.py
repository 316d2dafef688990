"""Where the tests' numerical tolerances come from (#44 point 3). Every tolerance a test writes is one of these names
(``tests/unit/test_tolerances.py`` fails on a bare number), so each comparison says why its bound is what it is.

Two kinds of bound:

- **a priori**, from the arithmetic: Higham's worst case for a reduction of ``n`` terms computed in another order or
  another precision, ``γ_n = n·u / (1 − n·u)`` relative to the sum of the terms' magnitudes (``u``: the unit
  roundoff, 2⁻²⁴ in float32, 2⁻⁵³ in float64). It holds for any rounding pattern, any kernel, any library version;
- **measured, with margin**, where the computation is a chain no a priori bound covers tightly (training steps
  through a network, an SVD): the largest difference measured over the suite's cases on the locked packages and on
  the newest releases (``setup.sh latest``), times a stated margin.

``pytest.approx(x)`` with no tolerance (pytest's relative 1e-6) is left for values computed in float64 from a handful
of operations (a mean of a few numbers, a learning-rate schedule's formula): the a priori bound there is below 1e-14.
"""

from __future__ import annotations

U32 = 2.0**-24  # float32's unit roundoff (half its machine epsilon)
U64 = 2.0**-53


def gamma(n: int, u: float = U32) -> float:
    """Higham's γ_n: the worst-case relative error of a sum (or dot product) of ``n`` terms in precision ``u``,
    relative to the sum of the terms' magnitudes (Accuracy and Stability of Numerical Algorithms, §3.1)."""
    assert n * u < 1
    return n * u / (1 - n * u)


# float64 against float64: the same formula evaluated in another order (a closed form, scikit-learn's metric,
# Opacus' accountant at the same orders). The longest computation compared is below 10^4 operations:
# γ_10^4 = 1.1e-12 in float64.
F64 = gamma(10_000, U64)

# float64 results of an iterative or series computation in another library (sacrebleu's n-gram statistics, Opacus'
# RDP at orders fedsim does not share): their own documented precision, 1e-9 relative.
F64_LIBRARY = 1e-9

# float32 linear algebra against the same algebra in float64 or in another order (ΔW = B·A of stacked factors against
# the sum of the clients' products, server averages, a merged weight): the longest reduction in the unit tests' tiny
# shapes is below 128 terms of magnitude ≤ 1 — γ_128 = 7.6e-6 in float32, used as relative and absolute bound.
F32_ALGEBRA = gamma(128)

# float32 elementwise arithmetic of a few operations (a clip factor, a step of SGD applied by hand): 8 roundings,
# γ_8 = 4.8e-7.
F32_ELEMENTWISE = gamma(8)

# float32 computations through the network — training steps, an evaluation's loss — that differ only in the order
# of their reductions (K clients packed in one pass against one by one, a batch split into micro-batches, a Ray
# worker against the driver's process, a loss recomputed from an exported adapter with plain PEFT): measured
# largest relative difference of the trained tensors and losses, 1.5e-6 over every packing, recipe and conformance
# case here (transformers 5.25, peft 0.21.2, bitsandbytes 0.50.2, torch 2.13 CPU), and 1.04e-5 once for an NF4 base when bitsandbytes picked another CPU 4-bit kernel (#44). Margin ×5 over the
# largest: 5e-5 — far below what a wrong row, client, mask or scaling gives (≥ 1e-3).
F32_NETWORK = 5e-5

# a float32 SVD (FlexLoRA's and HETLoRA's truncations, the low-rank SVD of B·A) against float64: measured largest
# error 1.9e-6 over the conformance cases (19 % of this bound, on the locked packages); margin ×5.
F32_SVD = 1e-5

# bf16 autocast against float32 training (a few steps; the loss itself is reduced in float32): within one bf16 unit
# roundoff (2⁻⁸ = 3.9e-3; bf16 keeps 8 significant bits) of the float32 loss — measured 4.7e-5 (a recipe's steps) and
# 1.4e-4 (PF2LoRA's bilevel step) relative. A check that autocast ran the same training, not a precision claim.
HALF_TRAINING = 2.0**-8

# an iteration that converges linearly, run far past convergence in float64 (SCAFFOLD on quadratics, 300 rounds):
# its distance to the exact optimum is at rounding level (measured 9e-16); 1e-8 is the bound the claim "converges to
# the optimum" needs, far below FedAvg's drift (> 0.05) that the same test measures.
F64_CONVERGED = 1e-8

# "this changes the result": two float32 network computations count as different only beyond 10× F32_NETWORK, so
# that rounding alone can never pass a check that something matters.
DIFFERENT = 10 * F32_NETWORK
