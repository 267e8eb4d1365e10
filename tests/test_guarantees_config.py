"""Guarantee 1: bad configuration fails early, naming the value and the choices.

Every field of ``GeneralizedBatchNorm`` (linen and NNX) and every argument of
the functional API (``make_measures``, ``batch_statistics``, ``normalize``).
Field errors are raised when the module is constructed (set-up);
shape-dependent errors (axis, mask, input dtype) when the function is traced
-- checked with ``jax.eval_shape``, which traces without running anything.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import gbn_jax
from gbn_jax import (
  GeneralizedBatchNorm,
  batch_statistics,
  make_measures,
  normalize,
)
from gbn_jax.nnx import GeneralizedBatchNorm as NnxGeneralizedBatchNorm

X = jnp.ones((4, 3), jnp.float32)


def _raises(exc, *fragments):
  """pytest.raises that also checks every fragment appears in the message."""
  return pytest.raises(exc, match="(?s)" + "".join(
      f"(?=.*{re.escape(f)})" for f in fragments))


# ---------------------------------------------------------------------------
# Measures: shared by the functional API and the module.
# ---------------------------------------------------------------------------

BAD_MEASURES = [
    # (kwargs, exception, fragments the message must contain)
    (dict(deviation="stdev"), ValueError,
     ["'stdev'", "'std'", "'superquantile'"]),
    (dict(deviation=None), ValueError, ["None", "'half_range'"]),
    (dict(deviation="std", statistic="avg"), ValueError,
     ["'avg'", "'mean'", "'quantile'"]),
    (dict(statistic=3), ValueError, ["3", "'midrange'"]),
    (dict(alpha=0.0), ValueError, ["alpha", "0.0", "(0, 1)"]),
    (dict(alpha=1.0), ValueError, ["alpha", "1.0", "(0, 1)"]),
    (dict(alpha=-0.2), ValueError, ["-0.2", "(0, 1)"]),
    (dict(alpha=float("nan")), ValueError, ["nan", "(0, 1)"]),
    (dict(alpha="0.5"), ValueError, ["'0.5'", "(0, 1)"]),
    (dict(alpha=True), ValueError, ["True", "(0, 1)"]),
    (dict(alpha=None), ValueError, ["alpha=None", "'quantile'", "(0, 1)"]),
    (dict(deviation="std", statistic="quantile", alpha=None), ValueError,
     ["alpha=None", "'quantile'"]),
    (dict(deviation="lp", p=0.5), ValueError, ["p", "0.5", ">= 1"]),
    (dict(deviation="lp", p=float("inf")), ValueError, ["inf", ">= 1"]),
    (dict(deviation="lp", p="2"), ValueError, ["'2'", ">= 1"]),
    (dict(deviation="mixed_superquantile"), ValueError,
     ["levels=None", "(0, 1)"]),
    (dict(deviation="mixed_superquantile", levels=()), ValueError,
     ["levels=()"]),
    (dict(deviation="mixed_superquantile", levels=(0.5, 1.5)), ValueError,
     ["levels[1]", "1.5", "(0, 1)"]),
    (dict(deviation="mixed_superquantile", levels=(0.5, 0.9),
          weights=(0.7, 0.7)),
     ValueError, ["sum to 1", "(0.7, 0.7)"]),
    (dict(deviation="mixed_superquantile", levels=(0.5, 0.9),
          weights=(1.5, -0.5)),
     ValueError, ["weights[1]", "-0.5", ">= 0"]),
    (dict(deviation="mixed_superquantile", levels=(0.5, 0.9), weights=(1.0,)),
     ValueError, ["2 levels", "1 weights"]),
    (dict(deviation="half_range", gaussian_consistent=True), ValueError,
     ["'half_range'", "'superquantile'"]),
    (dict(gaussian_consistent="yes"), ValueError,
     ["gaussian_consistent", "'yes'"]),
    (dict(use_fast_variance=None), ValueError, ["use_fast_variance", "None"]),
]


@pytest.mark.parametrize("kwargs,exc,fragments", BAD_MEASURES)
def test_bad_measures_everywhere(kwargs, exc, fragments):
  # make_measures
  with _raises(exc, *fragments):
    make_measures(**kwargs)
  # the functional API, at trace time (no computation runs)
  with _raises(exc, *fragments):
    jax.eval_shape(lambda x: batch_statistics(x, axes=0, **kwargs), X)
  # the module, when it is constructed (before init)
  with _raises(exc, *fragments):
    GeneralizedBatchNorm(use_running_average=False, **kwargs)
  # the NNX module, when it is constructed (use_fast_variance is its field too)
  with _raises(exc, *fragments):
    NnxGeneralizedBatchNorm(3, rngs=nnx.Rngs(0), **kwargs)


BAD_MODULE_FIELDS = [
    (dict(momentum=1.5), ValueError, ["momentum", "1.5", "[0, 1]"]),
    (dict(momentum=-0.1), ValueError, ["momentum", "-0.1"]),
    (dict(momentum=float("nan")), ValueError, ["momentum", "nan"]),
    (dict(epsilon=0.0), ValueError, ["epsilon", "0.0", "> 0"]),
    (dict(epsilon=-1e-5), ValueError, ["epsilon", "-1e-05"]),
    (dict(epsilon=float("inf")), ValueError, ["epsilon", "inf"]),
    (dict(dtype=jnp.int32), ValueError, ["dtype", "int32", "floating"]),
    (dict(dtype="float33"), ValueError, ["dtype", "'float33'"]),
    (dict(param_dtype=jnp.int8), ValueError, ["param_dtype", "int8"]),
    (dict(param_dtype=None), ValueError, ["param_dtype", "None"]),
    (dict(use_bias="no"), ValueError, ["use_bias", "'no'", "True or False"]),
    (dict(use_scale=1), ValueError, ["use_scale", "1"]),
    (dict(force_float32_reductions=None), ValueError,
     ["force_float32_reductions"]),
    (dict(use_running_average="train"), ValueError,
     ["use_running_average", "'train'"]),
    (dict(bias_init=0.0), ValueError, ["bias_init", "0.0", "initializer"]),
    (dict(scale_init="ones"), ValueError, ["scale_init", "'ones'"]),
    (dict(axis_index_groups=[[0, 1]]), ValueError,
     ["axis_index_groups", "axis_name"]),
    (dict(approximate="fast"), ValueError,
     ["approximate", "'fast'", "True or False"]),
    (dict(mode="stream"), ValueError, ["'stream'", "'batch'", "'online'"]),
]


@pytest.mark.parametrize("kwargs,exc,fragments", BAD_MODULE_FIELDS)
def test_bad_module_fields_at_setup(kwargs, exc, fragments):
  with _raises(exc, *fragments):
    GeneralizedBatchNorm(**kwargs)


@pytest.mark.parametrize(
    "kwargs,exc,fragments",
    [c for c in BAD_MODULE_FIELDS if "force_float32_reductions" not in c[0]],
)
def test_bad_nnx_module_fields_at_setup(kwargs, exc, fragments):
  """The NNX module checks the same fields (it has no
  force_float32_reductions)."""
  with _raises(exc, *fragments):
    NnxGeneralizedBatchNorm(3, rngs=nnx.Rngs(0), **kwargs)


def test_nnx_integer_input_is_a_type_error():
  layer = NnxGeneralizedBatchNorm(3, rngs=nnx.Rngs(0))
  with _raises(TypeError, "int32", "floating-point"):
    layer(X.astype(jnp.int32))


def _init(module, x, **kw):
  return module.init(jax.random.key(0), x, **kw)


def test_module_call_errors_at_trace_time():
  """Shape-dependent errors surface when the module is traced (init/apply)."""
  ok = GeneralizedBatchNorm(use_running_average=False)
  with _raises(ValueError, "axis 2", "rank 2", "-2..1"):
    jax.eval_shape(lambda x: _init(GeneralizedBatchNorm(False, axis=2), x), X)
  with _raises(TypeError, "axes must be integers", "'1'"):
    jax.eval_shape(lambda x: _init(GeneralizedBatchNorm(False, axis="1"), x), X)
  with _raises(ValueError, "mask of shape (5,)", "(4, 3)"):
    jax.eval_shape(lambda x: _init(ok, x, mask=jnp.ones(5, bool)), X)
  with _raises(TypeError, "int32", "floating-point"):
    jax.eval_shape(lambda x: _init(ok, x), X.astype(jnp.int32))
  variables = _init(ok, X)
  # integer input is refused with running averages too, not only in training
  with _raises(TypeError, "int32", "floating-point"):
    GeneralizedBatchNorm(use_running_average=True).apply(
        variables, X.astype(jnp.int32))
  # use_running_average left as None on both the field and the call
  with pytest.raises(ValueError, match="use_running_average"):
    GeneralizedBatchNorm().apply(variables, X)


BAD_CALLS = [
    (dict(axes=2), ValueError, ["axis 2", "-2..1"]),
    (dict(axes=(0, -3)), ValueError, ["axis -3", "-2..1"]),
    (dict(axes=0.5), TypeError, ["0.5", "integers"]),
    (dict(axes=0, mask=jnp.ones((3, 4), bool)), ValueError,
     ["(3, 4)", "(4, 3)"]),
    (dict(axes=0, axis_index_groups=[[0, 1]]), ValueError,
     ["axis_index_groups", "axis_name=None"]),
    (dict(axes=0, dtype=jnp.int16), ValueError, ["dtype", "int16", "floating"]),
    (dict(axes=0, force_float32_reductions="on"), ValueError,
     ["force_float32_reductions", "'on'"]),
    (dict(axes=0, approximate=None), ValueError, ["approximate", "None"]),
]


@pytest.mark.parametrize("kwargs,exc,fragments", BAD_CALLS)
def test_bad_batch_statistics_arguments_at_trace_time(kwargs, exc, fragments):
  with _raises(exc, *fragments):
    jax.eval_shape(lambda x: batch_statistics(x, **kwargs), X)


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.uint8, jnp.bool_])
def test_integer_input_is_a_type_error(dtype):
  with _raises(TypeError, str(jnp.dtype(dtype)), "floating-point", "astype"):
    jax.eval_shape(lambda x: batch_statistics(x, axes=0), X.astype(dtype))
  with _raises(TypeError, str(jnp.dtype(dtype)), "floating-point"):
    normalize(X.astype(dtype), jnp.zeros(3), jnp.ones(3), axes=0)


BAD_NORMALIZE = [
    (dict(axes=5), ValueError, ["axis 5", "-2..1"]),
    (dict(axes=0, epsilon=0.0), ValueError, ["epsilon", "0.0", "> 0"]),
    (dict(axes=0, epsilon=-1.0), ValueError, ["epsilon", "-1.0"]),
    (dict(axes=0, center=jnp.zeros(4)), ValueError, ["center", "(3,)", "(4,)"]),
    (dict(axes=0, dev_sq=jnp.ones((1, 3))), ValueError,
     ["dev_sq", "(3,)", "(1, 3)"]),
]


@pytest.mark.parametrize("kwargs,exc,fragments", BAD_NORMALIZE)
def test_bad_normalize_arguments(kwargs, exc, fragments):
  kwargs = dict(kwargs)
  center = kwargs.pop("center", jnp.zeros(3))
  dev_sq = kwargs.pop("dev_sq", jnp.ones(3))
  with _raises(exc, *fragments):
    jax.eval_shape(lambda x: normalize(x, center, dev_sq, **kwargs), X)


def test_traced_alpha_is_refused_with_a_clear_error():
  # α is a static setting: a traced α is a TypeError naming the fix.
  with _raises(TypeError, "alpha", "static"):
    jax.jit(lambda x, a: batch_statistics(x, axes=0, alpha=a))(X, 0.5)


def test_good_configurations_pass():
  """The validators do not refuse what docs/SPEC.md allows (guards the tests
  above)."""
  for dev in gbn_jax.DEVIATIONS:
    kw = dict(levels=(0.25, 0.75)) if "mixed" in dev else {}
    for stat in [None, *gbn_jax.STATISTICS]:
      skw = dict(kw)
      if stat == "mixed_quantile":
        skw = dict(levels=(0.25, 0.75))
      make_measures(stat, dev, alpha=0.9, p=1.0, **skw)
  # numpy scalars are numbers too; alpha=None is fine for measures without α
  make_measures("median", "median_abs", alpha=None)
  make_measures(deviation="lp", alpha=np.float32(0.3), p=np.float64(3.0))
  GeneralizedBatchNorm(momentum=0.0, epsilon=1e-12, dtype=jnp.bfloat16,
                       use_running_average=np.bool_(True))
  GeneralizedBatchNorm(momentum=1, deviation="mixed_superquantile",
                       levels=[0.5, 0.9], weights=[0.25, 0.75])
