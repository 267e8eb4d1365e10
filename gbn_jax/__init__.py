"""gbn_jax: Generalized Batch Normalization for JAX and Flax.

y = gamma * (x - S(x)) / sqrt(D(x)^2 + eps) + beta, with S a statistic and D a
generalized deviation measure (Yuan, Feng, Norton, Li; AAAI 2019).

The math (``catalogue``, ``config``, ``order_statistics``, ``functional``,
``sample``, ``online``, ``_layer``) imports jax only; ``GeneralizedBatchNorm``
(linen) and ``gbn_jax.nnx.GeneralizedBatchNorm`` (NNX) wrap it for Flax.
docs/SPEC.md is the contract.
"""

import importlib

from gbn_jax.catalogue import (
  DEVIATION_SPECS,
  DEVIATIONS,
  NATURAL_STATISTIC,
  STATISTIC_SPECS,
  STATISTICS,
  DeviationSpec,
  StatisticSpec,
  gaussian_consistency_factor,
)
from gbn_jax.functional import (
  Measures,
  batch_statistics,
  make_measures,
  normalize,
  sample_statistics,
)
from gbn_jax.order_statistics import kth_smallest, quantile_rank
from gbn_jax.sample import Sample

__version__ = "0.1.0"


def __getattr__(name: str):
  # The Flax wrapper is imported lazily so the functional core needs no flax.
  if name == "GeneralizedBatchNorm":
    from gbn_jax.linen import GeneralizedBatchNorm  # noqa: PLC0415

    return GeneralizedBatchNorm
  if name in ("linen", "nnx", "online"):
    return importlib.import_module(f"gbn_jax.{name}")
  raise AttributeError(f"module 'gbn_jax' has no attribute {name!r}")


__all__ = [
  "DEVIATIONS",
  "DEVIATION_SPECS",
  "NATURAL_STATISTIC",
  "STATISTICS",
  "STATISTIC_SPECS",
  "DeviationSpec",
  "GeneralizedBatchNorm",
  "Measures",
  "Sample",
  "StatisticSpec",
  "batch_statistics",
  "gaussian_consistency_factor",
  "kth_smallest",
  "make_measures",
  "normalize",
  "quantile_rank",
  "sample_statistics",
]
