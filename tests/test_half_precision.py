"""Guarantee 3: half precision reduces in float32, returns the requested dtype.

- bfloat16 / float16 input: S and D are computed in float32, from exactly the
  values a float32 input holding the same (rounded) numbers gives -- bit for
  bit;
- against float32 input before rounding, the output agrees within the stated
  tolerance |y_half - y_32| <= TOL * (1 + |y_32|), TOL = 2^-6 (bfloat16) and
  2^-9 (float16) -- a few units of the input rounding 2^-8 / 2^-11, which
  moves the values and may change which element an order statistic picks;
- the module returns ``dtype`` when given, else Flax's promotion rule (same
  dtype as ``flax.linen.BatchNorm`` for every combination below), and its
  running averages stay float32.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gbn_jax
from gbn_jax import batch_statistics
from tests.batched import many_statistics

HALF = [jnp.bfloat16, jnp.float16]
TOL = {jnp.bfloat16: 2.0**-6, jnp.float16: 2.0**-9}
DEVS = sorted(gbn_jax.DEVIATIONS)


def _kw(dev):
  kw = dict(alpha=0.7, p=3.0)
  if "mixed" in dev:
    kw["levels"] = (0.2, 0.9)
  return kw


def _data(shape=(16, 3), seed=0, loc=2.0):
  rng = np.random.default_rng(seed)
  return jnp.asarray(rng.normal(loc, 3.0, size=shape), jnp.float32)


@pytest.mark.slow
@pytest.mark.parametrize("half", HALF)
def test_functional_reduces_in_float32(half):
  x32 = _data()
  xh = x32.astype(half)
  mask = jnp.asarray(np.random.default_rng(1).random((16, 3)) < 0.8)
  configs = [dict(deviation=dev, **_kw(dev)) for dev in DEVS]
  for m in (None, mask):
    # every deviation on one Sample per input, in one compiled program
    half = many_statistics(xh, configs, axes=0, mask=m)
    # the same numbers as float32: identical statistics
    full = many_statistics(xh.astype(jnp.float32), configs, axes=0, mask=m)
    for dev, (sh, dh), (s2, d2) in zip(DEVS, half, full, strict=True):
      assert sh.dtype == dh.dtype == jnp.float32
      np.testing.assert_array_equal(np.asarray(sh), np.asarray(s2), dev)
      np.testing.assert_array_equal(np.asarray(dh), np.asarray(d2), dev)
  # and once through the public batch_statistics
  sh, dh = batch_statistics(xh, axes=0, deviation="superquantile", mask=mask,
                            **_kw("superquantile"))
  assert sh.dtype == dh.dtype == jnp.float32
  s2, d2 = batch_statistics(xh.astype(jnp.float32), axes=0,
                            deviation="superquantile", mask=mask,
                            **_kw("superquantile"))
  np.testing.assert_array_equal(np.asarray(sh), np.asarray(s2))
  np.testing.assert_array_equal(np.asarray(dh), np.asarray(d2))


@pytest.mark.slow
def test_float16_range_does_not_overflow():
  # values near float16's max: their squares and sums overflow in float16,
  # not in the float32 reduction
  x = jnp.clip(_data(loc=0.0) * 2e4, -65000, 65000).astype(jnp.float16)
  assert np.isfinite(np.asarray(x, np.float32)).all()
  for dev in DEVS:
    s, d = batch_statistics(x, axes=0, deviation=dev, **_kw(dev))
    assert np.isfinite(np.asarray(s)).all() and np.isfinite(np.asarray(d)).all()
    assert (np.asarray(d) > 1e3).all(), dev


@pytest.mark.slow
@pytest.mark.parametrize("half", HALF)
def test_module_output_agrees_with_float32(half):
  x32 = _data((8, 4, 3), seed=2)
  for dev in DEVS:
    m32 = gbn_jax.GeneralizedBatchNorm(use_running_average=False, deviation=dev,
                                       **_kw(dev))
    mh = m32.clone(dtype=half)
    v = m32.init(jax.random.key(0), x32)
    y32, u32 = m32.apply(v, x32, mutable=["batch_stats"])
    yh, uh = mh.apply(v, x32.astype(half), mutable=["batch_stats"])
    assert yh.dtype == half
    err = np.abs(np.asarray(yh, np.float32) - np.asarray(y32))
    assert (err <= TOL[half] * (1 + np.abs(np.asarray(y32)))).all(), (
        dev, err.max())
    for name in ("mean", "var"):
      assert uh["batch_stats"][name].dtype == jnp.float32
      np.testing.assert_allclose(np.asarray(uh["batch_stats"][name]),
                                 np.asarray(u32["batch_stats"][name]),
                                 rtol=TOL[half], atol=TOL[half])
    # evaluation with the running averages: half in, half out, float32 state
    ye = mh.clone(use_running_average=True).apply({**v, **uh}, x32.astype(half))
    assert ye.dtype == half and np.isfinite(np.asarray(ye, np.float32)).all()


@pytest.mark.parametrize("half", HALF)
@pytest.mark.parametrize("dtype,param_dtype",
                         [(None, jnp.float32), (None, "half"),
                          ("half", jnp.float32)])
def test_dtypes_follow_flax(half, dtype, param_dtype):
  dtype = half if dtype == "half" else dtype
  param_dtype = half if param_dtype == "half" else param_dtype
  x = _data((6, 3)).astype(half)
  kw = dict(use_running_average=False, dtype=dtype, param_dtype=param_dtype)
  ours = gbn_jax.GeneralizedBatchNorm(statistic="mean", deviation="std", **kw)
  flax_bn = nn.BatchNorm(**kw)
  v_ours = ours.init(jax.random.key(0), x)
  v_flax = flax_bn.init(jax.random.key(0), x)
  y_ours, s_ours = ours.apply(v_ours, x, mutable=["batch_stats"])
  y_flax, s_flax = flax_bn.apply(v_flax, x, mutable=["batch_stats"])
  assert y_ours.dtype == y_flax.dtype
  tol = TOL[half]
  np.testing.assert_allclose(np.asarray(y_ours, np.float32),
                             np.asarray(y_flax, np.float32), rtol=tol, atol=tol)
  for name in ("mean", "var"):
    assert s_ours["batch_stats"][name].dtype == jnp.float32
    assert s_flax["batch_stats"][name].dtype == jnp.float32
    assert v_ours["batch_stats"][name].dtype == jnp.float32
