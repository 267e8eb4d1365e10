"""Every bad configuration raises a ValueError naming the value and the choices.

docs/SPEC.md §5: unknown names, α outside (0, 1), p < 1, a statistic that
needs an α without one, bad mixture levels/weights -- at set-up (module
construction) or trace time (the functional API, also under jit), never a NaN
later.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gbn_jax

DEV_NAMES = sorted(gbn_jax.DEVIATIONS)
STAT_NAMES = sorted(gbn_jax.STATISTICS)

# (bad configuration, substrings the message must contain: the bad value as
# repr'd and the valid choices).
BAD = [
    (dict(deviation="cvar"), ["'cvar'"] + [repr(n) for n in DEV_NAMES]),
    (dict(deviation="Superquantile"), ["'Superquantile'", "'superquantile'"]),
    (dict(deviation=None), ["None", "'std'", "'half_range'"]),
    (dict(statistic="mode"), ["'mode'"] + [repr(n) for n in STAT_NAMES]),
    (dict(statistic=3), ["3", "'median'", "'quantile'"]),
    (dict(alpha=0.0), ["0.0", "(0, 1)"]),
    (dict(alpha=1.0), ["1.0", "(0, 1)"]),
    (dict(alpha=-0.2), ["-0.2", "(0, 1)"]),
    (dict(alpha=1.5), ["1.5", "(0, 1)"]),
    (dict(alpha=math.nan), ["nan", "(0, 1)"]),
    (dict(alpha=math.inf), ["inf", "(0, 1)"]),
    (dict(alpha="0.5"), ["'0.5'", "(0, 1)"]),
    (dict(alpha=True), ["True", "(0, 1)"]),
    (dict(alpha=np.float32(2.0)), ["2.0", "(0, 1)"]),
    (dict(alpha=None), ["alpha=None", "'quantile'", "(0, 1)"]),
    (dict(alpha=None, statistic="quantile", deviation="std"),
     ["alpha=None", "'quantile'", "(0, 1)"]),
    (dict(p=0.5, deviation="lp"), ["0.5", ">= 1"]),
    (dict(p=0, deviation="lp"), ["0", ">= 1"]),
    (dict(p=-2.0), ["-2.0", ">= 1"]),
    (dict(p=math.nan, deviation="lp"), ["nan", ">= 1"]),
    (dict(p=math.inf, deviation="lp"), ["inf", ">= 1"]),
    (dict(p="2", deviation="lp"), ["'2'", ">= 1"]),
    (dict(deviation="mixed_superquantile"), ["levels=None", "(0, 1)"]),
    (dict(deviation="mixed_superquantile", levels=()), ["levels=()", "(0, 1)"]),
    (dict(deviation="mixed_superquantile", levels=(0.2, 1.2)),
     ["1.2", "(0, 1)", "levels[1]"]),
    (dict(deviation="mixed_superquantile", levels="0.5"), ["'0.5'", "(0, 1)"]),
    (dict(statistic="mixed_quantile", deviation="std"), ["levels=None"]),
    (dict(deviation="mixed_superquantile", levels=(0.2, 0.7),
          weights=(1.0,)), ["(1.0,)", "2 levels", "weights"]),
    (dict(deviation="mixed_superquantile", levels=(0.2, 0.7),
          weights=(-0.2, 1.2)), ["-0.2", ">= 0"]),
    (dict(deviation="mixed_superquantile", levels=(0.2, 0.7),
          weights=(0.3, 0.3)), ["(0.3, 0.3)", "sum to 1"]),
    (dict(deviation="mixed_superquantile", levels=(0.2, 0.7),
          weights=(0.5, math.nan)), ["nan", ">= 0"]),
    (dict(deviation="mixed_superquantile", levels=(0.2, 0.7), weights="ab"),
     ["'ab'", "summing to 1"]),
    (dict(deviation="half_range", gaussian_consistent=True),
     ["'half_range'", "'superquantile'", "'std'"]),
    (dict(gaussian_consistent="yes"), ["'yes'", "True or False"]),
    (dict(axis_index_groups=[[0, 1]]), ["[[0, 1]]", "axis_name"]),
]


def _ids(case):
  return ",".join(f"{k}={v!r}" for k, v in case.items())


def _check_message(exc, must_contain):
  msg = str(exc.value)
  for s in must_contain:
    assert s in msg, f"{s!r} not in message {msg!r}"


@pytest.mark.parametrize("case,must_contain", BAD,
                         ids=[_ids(c) for c, _ in BAD])
def test_bad_configuration_raises_everywhere(case, must_contain):
  x = jnp.ones((4, 3))
  # The functional API, eagerly ...
  with pytest.raises(ValueError) as exc:
    gbn_jax.batch_statistics(x, axes=0, **case)
  _check_message(exc, must_contain)
  # ... and when traced under jit (before anything runs).
  with pytest.raises(ValueError) as exc:
    jax.jit(lambda x: gbn_jax.batch_statistics(x, axes=0, **case)).lower(x)
  _check_message(exc, must_contain)
  # The module: when it is set up, not at the first call.
  with pytest.raises(ValueError) as exc:
    gbn_jax.GeneralizedBatchNorm(**case)
  _check_message(exc, must_contain)


def test_make_measures_raises_the_same():
  for case, must_contain in BAD:
    case = {k: v for k, v in case.items() if k != "axis_index_groups"}
    if not case:
      continue
    with pytest.raises(ValueError) as exc:
      gbn_jax.make_measures(**case)
    _check_message(exc, must_contain)


@pytest.mark.slow
def test_good_configurations_do_not_raise():
  # The boundary of each rule, on the valid side.
  x = jnp.asarray(np.random.default_rng(0).gamma(2.0, size=(9, 2)),
                  jnp.float32)
  for case in (dict(alpha=1e-6), dict(alpha=1 - 1e-6),
               dict(alpha=np.float64(0.3)),
               dict(p=1.0, deviation="lp"), dict(p=1, deviation="lp"),
               dict(alpha=None, deviation="std"),
               dict(deviation="mixed_superquantile", levels=[0.5, 0.9]),
               dict(deviation="mixed_superquantile", levels=(0.5, 0.9),
                    weights=(0.0, 1.0)),
               dict(statistic="midrange", deviation="superquantile")):
    c, d = gbn_jax.batch_statistics(x, axes=0, **case)
    assert np.all(np.isfinite(c)) and np.all(np.isfinite(d)), case
    gbn_jax.GeneralizedBatchNorm(**case)


def test_bad_input_and_axes():
  x = jnp.ones((4, 3, 2))
  with pytest.raises(ValueError) as exc:
    gbn_jax.batch_statistics(x, axes=(0, 3))
  _check_message(exc, ["3", "-3..2"])
  with pytest.raises(ValueError) as exc:
    gbn_jax.batch_statistics(x, axes=0, mask=jnp.ones((5, 3, 2), bool))
  _check_message(exc, ["(5, 3, 2)", "(4, 3, 2)"])
  module = gbn_jax.GeneralizedBatchNorm(use_running_average=False, axis=5)
  with pytest.raises(ValueError) as exc:
    module.init(jax.random.key(0), x)
  _check_message(exc, ["5", "-3..2"])
  module = gbn_jax.GeneralizedBatchNorm(use_running_average=False)
  with pytest.raises(ValueError) as exc:
    module.init(jax.random.key(0), x, mask=jnp.ones((2, 3), bool))
  _check_message(exc, ["(2, 3)", "(4, 3, 2)"])
  # Integer input is a type error (cast first), not a silent truncation.
  with pytest.raises(TypeError, match="int32"):
    gbn_jax.batch_statistics(jnp.ones((4, 3), jnp.int32), axes=0)


def test_gaussian_consistency_factor_rejects_half_range():
  with pytest.raises(ValueError) as exc:
    gbn_jax.gaussian_consistency_factor("half_range")
  _check_message(exc, ["'half_range'", "'superquantile'"])
