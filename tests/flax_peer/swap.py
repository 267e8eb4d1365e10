"""The one place where the peer suite puts GBN where Flax's tests use BatchNorm.

``linen_batchnorm(config)`` and ``nnx_batchnorm(config)`` return a subclass of
``gbn_jax.GeneralizedBatchNorm`` / ``gbn_jax.nnx.GeneralizedBatchNorm`` whose
defaults are those of ``CONFIGS[config]`` and nothing else changed (a
``functools.partial`` that is still a class). The class is named
``BatchNorm``, as Flax's own, so Flax's automatic names (``BatchNorm_0``) and
its summaries read the same; a user's unnamed ``GeneralizedBatchNorm`` is
called ``GeneralizedBatchNorm_0`` instead.

``config`` is ``"mean_std"`` (``statistic="mean", deviation="std"``, which is
``BatchNorm``) or ``"default"`` (the library's defaults: the median with the
superquantile deviation). Tests that assert BatchNorm's own numbers run with
``MEAN_STD``; the others with ``BOTH``.
"""

import functools

import pytest

import gbn_jax
import gbn_jax.nnx as gbn_nnx

CONFIGS = {
    "mean_std": {"statistic": "mean", "deviation": "std"},
    "default": {},
}

MEAN_STD = pytest.mark.parametrize("config", ["mean_std"])
BOTH = pytest.mark.parametrize("config", list(CONFIGS))


def _named(cls):
  cls.__qualname__ = cls.__name__ = "BatchNorm"
  cls.__module__ = __name__
  return cls


@functools.cache
def linen_batchnorm(config="mean_std"):
  """``flax.linen.BatchNorm`` for the peer suite: a GBN with ``config``."""
  fields = CONFIGS[config]
  parent = gbn_jax.GeneralizedBatchNorm
  namespace = {
      "__annotations__": {
          k: parent.__dataclass_fields__[k].type for k in fields
      },
      **fields,
  }
  return _named(type("BatchNorm", (parent,), namespace))


@functools.cache
def nnx_batchnorm(config="mean_std"):
  """``flax.nnx.BatchNorm`` for the peer suite: a GBN with ``config``."""
  fields = CONFIGS[config]
  parent = gbn_nnx.GeneralizedBatchNorm

  def __init__(self, num_features, **kwargs):
    parent.__init__(self, num_features, **{**fields, **kwargs})

  return _named(type("BatchNorm", (parent,), {"__init__": __init__}))
