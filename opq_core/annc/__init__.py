"""ANNC projections: knapsack pruning, zero-anchored 1-D k-means, multiple-choice knapsack.

ANNC (constrained sparsity-quantization joint learning) trains under the model-size
constraint

.. math::

    \\sum_l \\operatorname{nnz}(W_l)\\, b_l \\le S

by ADMM. Its two projections need no framework and live here (the training loop is in
``opq_torch.annc``):

* **pruning projection** (:func:`prune_to_budget`): with the bit-widths ``b_l`` fixed,
  keeping a weight ``w`` of layer ``l`` saves ``w^2`` of squared error and costs ``b_l``
  bits, a 0-1 knapsack. It is solved greedily in density order ``w^2 / b_l`` with an
  O(N) sampled band selection instead of a sort of all weights;
* **quantization projection** (:func:`quantize_projection`): with the masks fixed, every
  layer's kept weights are clustered for every bit-width ``b`` in 1..8 into ``2^b``
  non-zero centroids (:func:`kmeans_zero_anchored`), giving an error table
  ``E[l, b]``; one bit-width per layer is then chosen by a multiple-choice knapsack
  (:func:`choose_bits`).

:func:`project` alternates the two; :func:`annc_plan` turns the result into a
:class:`~opq_core.Plan` (``method="annc"``, ``grid="codebook"``) that the
kernels, the adapter and the file format consume like an OPQ plan.

Accounting: ``b`` bits per kept weight (paper rate ``32 N / sum_l b_l nnz_l``); a kept
weight takes one of the ``2^b`` non-zero centroids, the fixed zero centroid means pruned.
"""
from __future__ import annotations

from .._check import BITS
from .kmeans import KMeansResult, kmeans_zero_anchored
from .mckp import BitChoice, choose_bits
from .project import (
                      Projection,
                      QuantResult,
                      annc_budget,
                      annc_plan,
                      min_budget_bits,
                      project,
                      quantize_projection,
)
from .prune import PruneResult, prune_to_budget

__all__ = [
    "BITS", "PruneResult", "prune_to_budget", "KMeansResult", "kmeans_zero_anchored",
    "BitChoice", "choose_bits", "QuantResult", "quantize_projection", "Projection",
    "project", "annc_budget", "min_budget_bits", "annc_plan",
]
