"""Guarantee 6: fuzzing the functional API.

Hypothesis draws a configuration -- statistic, deviation, α, p, levels and
weights, Gaussian consistency, axes, mask, dtype; each either valid or one of
the documented bad values -- and an input. An independent oracle below (the
rules of docs/SPEC.md, not the library's validators) says whether the call is
valid:

- invalid: the call raises the documented exception (``ValueError`` for
  configuration, ``TypeError`` for integer input), before anything runs;
- valid: S and D are finite and equal the float64 NumPy reference
  (tests/_ref_reliability.py) on the same (dtype-rounded) values, and so is
  the normalized output.

Budget: ``max_examples=N_EXAMPLES`` (40: every valid example compiles its own
configuration, about a second each; shapes from a small set).
"""

import math

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

import gbn_jax
from gbn_jax import batch_statistics, normalize
from tests import _ref_reliability as ref

N_EXAMPLES = 40
# jitted with the configuration static (an un-jitted call would re-compile
# any lax.while_loop of the selection engine on every call)
_STATIC = ("axes", "statistic", "deviation", "alpha", "p", "levels", "weights",
           "gaussian_consistent")
_stats = jax.jit(batch_statistics, static_argnames=_STATIC)
DEVS = sorted(gbn_jax.DEVIATIONS)
STATS = sorted(gbn_jax.STATISTICS)
SHAPES = [(10, 3), (3, 4, 2), (2, 2, 3, 2)]
DTYPES = [jnp.float32, jnp.float32, jnp.bfloat16, jnp.float16, jnp.int32]
BAD_LEVELS = [0.0, 1.0, -0.5, 1.5, float("nan")]


def _is_level(a):
  return isinstance(a, (int, float)) and not isinstance(a, bool) and 0 < a < 1


@st.composite
def inputs(draw, shape):
  """Spread-out data (a seeded normal sample, ties by rounding some of the
  time), or hypothesis' own arrays (constant runs, extremes of the range)."""
  kind = draw(st.sampled_from(["normal", "normal", "rounded", "hypothesis"]))
  if kind == "hypothesis":
    return draw(hnp.arrays(np.float32, shape, elements=st.floats(
        -1e3, 1e3, width=32, allow_subnormal=False)))
  rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
  loc = draw(st.sampled_from([0.0, 3.0, -50.0]))
  scale = draw(st.sampled_from([1e-2, 1.0, 30.0]))
  x = rng.standard_t(4, size=shape) * scale + loc  # heavy tails: outliers
  if kind == "rounded":
    x = np.round(x / scale) * scale  # many ties
  return x.astype(np.float32)


FAULTS = ["none"] * 8 + [
    "deviation", "statistic", "alpha", "alpha_none", "p", "levels",
    "weights_sum", "weights_negative", "weights_length", "gaussian",
    "axes", "mask", "int_dtype"]


@st.composite
def configs(draw):
  """A valid configuration, then (half of the time) one injected fault."""
  shape = draw(st.sampled_from(SHAPES))
  ndim = len(shape)
  dev = draw(st.sampled_from(DEVS))
  cfg = dict(deviation=dev,
             statistic=draw(st.sampled_from([None, None, *STATS])),
             alpha=draw(st.floats(0.01, 0.99)),
             p=draw(st.floats(1.0, 6.0)),
             gaussian_consistent=dev != "half_range" and draw(st.booleans()))
  if ("mixed" in dev or cfg["statistic"] == "mixed_quantile"
      or draw(st.booleans())):
    n = draw(st.integers(1, 3))
    cfg["levels"] = tuple(draw(st.lists(st.floats(0.05, 0.95), min_size=n,
                                        max_size=n)))
    if n == 2 and draw(st.booleans()):
      w = draw(st.floats(0.0, 1.0))
      cfg["weights"] = (w, 1.0 - w)
  n_red = draw(st.integers(1, ndim - 1))
  axes = list(draw(st.permutations(range(ndim)))[:n_red])
  dtype = draw(st.sampled_from(DTYPES[:-1]))
  x = draw(inputs(shape))
  mask_kind = draw(st.sampled_from(["none", "full", "broadcast"]))
  mask = None
  if mask_kind == "full":
    mask = draw(hnp.arrays(np.bool_, shape))
  elif mask_kind == "broadcast":
    mshape = tuple(d if draw(st.booleans()) else 1 for d in shape)
    mask = draw(hnp.arrays(np.bool_, mshape))

  fault = draw(st.sampled_from(FAULTS))
  if fault == "deviation":
    cfg["deviation"] = draw(st.sampled_from(["variance", "Std", "", None, 3]))
  elif fault == "statistic":
    cfg["statistic"] = draw(st.sampled_from(["mode", "Mean", "", 0.5]))
  elif fault == "alpha":
    cfg["alpha"] = draw(st.sampled_from([*BAD_LEVELS, "0.5", True]))
  elif fault == "alpha_none":
    cfg["alpha"] = None  # an error only where a quantile needs it
  elif fault == "p":
    cfg["p"] = draw(st.sampled_from([0.5, 0.0, -1.0, float("inf"),
                                     float("nan")]))
  elif fault == "levels":
    bad = draw(st.sampled_from([*BAD_LEVELS, "empty"]))
    cfg["levels"] = () if bad == "empty" else (0.5, bad)
    cfg.pop("weights", None)
  elif fault.startswith("weights"):
    levels = cfg.setdefault("levels", (0.3, 0.8))
    n = len(levels)
    cfg["weights"] = {"weights_sum": (0.7,) * n,
                      "weights_negative": ((1.5,)
                                           + (-0.5 / max(n - 1, 1),) * (n - 1)),
                      "weights_length": (1.0 / (n + 1),) * (n + 1)}[fault]
  elif fault == "gaussian":
    cfg["deviation"], cfg["gaussian_consistent"] = "half_range", True
  elif fault == "axes":
    axes.append(draw(st.sampled_from([ndim, -ndim - 1, ndim + 3])))
  elif fault == "mask":
    mask = np.ones((*shape[:-1], shape[-1] + 1), bool)
  elif fault == "int_dtype":
    dtype = draw(st.sampled_from([jnp.int32, jnp.int8, jnp.bool_]))
  cfg["axes"] = tuple(a - ndim if draw(st.booleans()) and 0 <= a < ndim else a
                      for a in axes)
  return cfg, x, dtype, mask


def _expected_error(cfg, x, dtype, mask):
  """docs/SPEC.md's rules: the exception types a call may raise (none:
  valid)."""
  errors = set()
  dev, stat = cfg["deviation"], cfg["statistic"]
  if not isinstance(dev, str) or dev not in DEVS:
    return {ValueError}
  stat = stat if stat is not None else ref.NATURAL[dev]
  if not isinstance(stat, str) or stat not in STATS:
    return {ValueError}
  alpha = cfg["alpha"]
  if alpha is not None and not _is_level(alpha):
    errors.add(ValueError)
  if alpha is None and ("quantile" in (stat, dev) or dev == "superquantile"):
    errors.add(ValueError)
  if not (cfg["p"] >= 1 and math.isfinite(cfg["p"])):  # nan: both False
    errors.add(ValueError)
  levels, weights = cfg.get("levels"), cfg.get("weights")
  mixed = "mixed" in stat + dev or levels is not None or weights is not None
  if mixed and (
      not levels or not all(_is_level(a) for a in levels)
      or (weights is not None
          and (len(weights) != len(levels) or min(weights) < 0
               or abs(sum(weights) - 1) > 1e-6))):
    errors.add(ValueError)
  if cfg["gaussian_consistent"] and dev == "half_range":
    errors.add(ValueError)
  if any(not -x.ndim <= a < x.ndim for a in cfg["axes"]):
    errors.add(ValueError)
  if mask is not None:
    try:
      np.broadcast_to(mask, x.shape)
    except ValueError:
      errors.add(ValueError)
  if not jnp.issubdtype(dtype, jnp.floating):
    errors.add(TypeError)
  return errors


def _params(cfg):
  kw = {k: cfg[k] for k in ("alpha", "p")}
  levels = cfg.get("levels")
  if levels is not None:
    kw["levels"] = levels
    kw["weights"] = cfg.get("weights") or (1.0 / len(levels),) * len(levels)
  return kw


@pytest.mark.slow
@settings(max_examples=N_EXAMPLES, deadline=None, derandomize=True,
          database=None)
@given(configs())
def test_fuzz_functional_api(case):
  cfg, x, dtype, mask = case
  xd = jnp.asarray(x).astype(dtype)
  errors = _expected_error(cfg, x, dtype, mask)
  kwargs = {k: v for k, v in cfg.items() if k != "axes"}
  event("expected error" if errors else "valid: compared with NumPy")
  if errors:
    with pytest.raises(tuple(errors)) as info:
      batch_statistics(xd, axes=cfg["axes"], mask=mask, **kwargs)
    # the message names what was wrong (some bad value or name is quoted)
    assert len(str(info.value)) > 20
    return
  s, d = _stats(xd, axes=cfg["axes"], mask=mask, **kwargs)
  s, d = np.asarray(s), np.asarray(d)
  assert s.dtype == d.dtype == np.float32  # half precision reduces in float32
  assert np.isfinite(s).all() and np.isfinite(d).all()
  values = np.asarray(xd.astype(jnp.float32), np.float64)  # what the call saw
  rs, rd = ref.batch_statistics(
      values, cfg["axes"], statistic_name=cfg["statistic"],
      deviation_name=cfg["deviation"], mask=mask,
      gaussian_consistent=cfg["gaussian_consistent"], **_params(cfg))
  scale = np.max(np.abs(values)) + 1.0
  np.testing.assert_allclose(s, rs, rtol=1e-5, atol=2e-6 * scale)
  # std included: batch_statistics defaults to the two-pass variance
  np.testing.assert_allclose(d, rd, rtol=1e-4, atol=2e-6 * scale)
  y = np.asarray(normalize(xd, s, d**2, axes=cfg["axes"], epsilon=1e-3))
  assert np.isfinite(y).all()
  ry = ref.normalize(values, rs, rd,
                     tuple(sorted({a % x.ndim for a in cfg["axes"]})),
                     epsilon=1e-3)
  err = np.abs(y - ry)
  assert (err <= 1e-3 * (1 + np.abs(ry))).all(), err.max()
