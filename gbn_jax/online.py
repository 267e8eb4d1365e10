"""Online mode: running estimates of S and D that include the current batch.

In training, ``state_t = update(state_{t-1}, batch_t)`` and the batch is
normalized with S and D of ``state_t``, so every batch size, 1 included,
gets a meaningful normalization (Chiley et al. 2019; Liao, Kawaguchi &
Poggio 2016). The running quantities ("trackers": the mean, Robbins–Monro
quantile iterates of x and of |x - μ|, decaying extremes, the running mean
of each deviation's per-value moment φ) are masked, device-pooled averages
of the :class:`Sample`; each measure's online form is a field of its
catalogue record. docs/ONLINE.md gives every update, the initial state and
what is differentiated (the current batch's contribution only).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from gbn_jax import catalogue
from gbn_jax.catalogue import OnlineDeviation, OnlineStatistic
from gbn_jax.config import Measures, check_momentum
from gbn_jax.sample import Sample

Array = jax.Array

DEFAULT_QUANTILE_STEP = math.pi
"""η / (r s): the Newton step at the median of a normal distribution."""


class Trackers(NamedTuple):
  """Updated running quantities, per channel (None where not kept)."""

  mu: Array | None
  quantiles: dict  # level α -> q_α
  max: Array | None
  min: Array | None
  abs_quantiles: dict | None = None  # level α -> q_α of |x - μ|


ONLINE_STATISTICS = {
  n: s.online
  for n, s in catalogue.STATISTIC_SPECS.items()
  if s.online is not None
}
"""Statistic name -> its online estimate (a view of the catalogue records)."""

ONLINE_DEVIATIONS = {
  n: d.online
  for n, d in catalogue.DEVIATION_SPECS.items()
  if d.online is not None
}
"""Deviation name -> its online estimate (a view of the catalogue records)."""


def _entries(measures: Measures) -> tuple[OnlineStatistic, OnlineDeviation]:
  stat = measures.statistic_spec.online
  if stat is None:
    raise ValueError(
      f"statistic {measures.statistic!r} has no online estimate; online mode"
      f" supports {sorted(ONLINE_STATISTICS)}"
    )
  dev = measures.deviation_spec.online
  if dev is None:
    raise ValueError(
      f"deviation {measures.deviation!r} has no online estimate; online mode"
      f" supports {sorted(ONLINE_DEVIATIONS)}"
    )
  return stat, dev


def check_online(measures: Measures) -> None:
  """``ValueError`` naming the measure if the configuration has no online
  form (what ``mode="online"`` checks when a layer is set up)."""
  _entries(measures)


def _needs(measures: Measures) -> tuple:
  stat, dev = _entries(measures)
  return stat.needs(**measures.statistic_kwargs) + dev.needs(
    **measures.deviation_kwargs
  )


def abs_quantile_levels(measures: Measures) -> tuple[float, ...]:
  """The levels α whose quantile of |x - μ| is tracked, in stacking order."""
  out = []
  for need in _needs(measures):
    if isinstance(need, tuple) and need[0] == "abs" and need[1] not in out:
      out.append(need[1])
  return tuple(out)


def quantile_levels(measures: Measures) -> tuple[float, ...]:
  """The levels α whose quantile is tracked, in the order they are stacked."""
  out = []
  for need in _needs(measures):
    if isinstance(need, float) and need not in out:
      out.append(need)
  return tuple(out)


def init_state(
  measures: Measures, channel_shape: Sequence[int], dtype: Any = jnp.float32
) -> dict[str, Array]:
  """The initial online state (only the trackers this configuration reads).

  Raises ``ValueError`` if a measure has no online estimate.
  """
  needs = _needs(measures)
  shape = tuple(channel_shape)
  state = {}
  if "mu" in needs:
    state["online_mu"] = jnp.zeros(shape, dtype)
  levels = quantile_levels(measures)
  if levels:
    state["online_quantiles"] = jnp.zeros((len(levels), *shape), dtype)
    state["online_quantile_scale"] = jnp.ones((len(levels), *shape), dtype)
  abs_levels = abs_quantile_levels(measures)
  if abs_levels:
    state["online_abs_quantiles"] = jnp.zeros((len(abs_levels), *shape), dtype)
    state["online_abs_quantile_scale"] = jnp.ones(
      (len(abs_levels), *shape), dtype
    )
  if "extremes" in needs:
    state["online_max"] = jnp.ones(shape, dtype)
    state["online_min"] = -jnp.ones(shape, dtype)
  if _entries(measures)[1].moment is not None:
    state["online_moment"] = jnp.ones(shape, dtype)
  return state


def _fraction_at_or_below(transform, qe):
  return lambda x: (transform(x) <= qe).astype(x.dtype)  # F̂(q) per value


def _abs_distance(transform, qe):
  return lambda x: jnp.abs(transform(x) - qe)


def _track_quantiles(
  sample, transform, levels, qs_old, scales_old, r, b, quantile_step
):
  """One Robbins–Monro step per level on the values ``transform(x)``."""
  if not levels:
    return {}, {}
  qs, scales, out = [], [], {}
  for i, a in enumerate(levels):
    q, s = qs_old[i], scales_old[i]
    below = sample.average(_fraction_at_or_below(transform, sample.expand(q)))
    q = q + (quantile_step * r * s) * (a - below)
    s = b * s + r * sample.average(_abs_distance(transform, sample.expand(q)))
    out[a] = q
    qs.append(q)
    scales.append(s)
  return out, {"quantiles": jnp.stack(qs), "quantile_scale": jnp.stack(scales)}


def update(
  measures: Measures,
  state: dict[str, Array],
  sample: Sample,
  *,
  momentum: float = 0.99,
  quantile_step: float = DEFAULT_QUANTILE_STEP,
) -> tuple[Array, Array, dict[str, Array]]:
  """Absorbs the batch into the running estimates; returns (S, D^2, state).

  Args:
    measures: the checked configuration (:func:`gbn_jax.make_measures`).
    state: the previous state (:func:`init_state` at the start).
    sample: the current batch, with its mask and ``axis_name``.
    momentum: β, the weight of the past in every running estimate.
    quantile_step: η / (r s) of the Robbins–Monro update (> 0).

  Returns:
    ``(center, dev_sq, new_state)``: S and D^2 of the updated state (to
    normalize the current batch with; differentiable through the current
    batch as the module docstring states) and the new state (no gradient).
    A channel with no valid value keeps its state, and S, D^2 are the old
    state's.
  """
  beta = check_momentum(momentum, "online")
  if not quantile_step > 0:
    raise ValueError(f"quantile_step must be > 0; got {quantile_step!r}")
  stat, dev = _entries(measures)
  old = {k: lax.stop_gradient(jnp.asarray(v)) for k, v in state.items()}
  expected = init_state(measures, sample.channel_shape)
  if set(old) != set(expected):
    raise ValueError(
      f"online state has keys {sorted(old)}; this configuration needs"
      f" {sorted(expected)}"
    )
  x = sample.x
  # r = 1 - β where the channel has a valid value, 0 where it has none (the
  # masked averages are 0 there), so an empty channel keeps its state.
  r = (1.0 - beta) * (sample.count() > 0).astype(x.dtype)
  b = 1.0 - r
  new = {}

  mu = None
  if "online_mu" in old:
    mu = b * old["online_mu"] + r * sample.mean()
    new["online_mu"] = mu

  quantiles, new_q = _track_quantiles(
    sample,
    lambda x: x,
    quantile_levels(measures),
    old.get("online_quantiles"),
    old.get("online_quantile_scale"),
    r,
    b,
    quantile_step,
  )
  new.update({f"online_{k}": v for k, v in new_q.items()})
  abs_quantiles = {}
  abs_levels = abs_quantile_levels(measures)
  if abs_levels:
    assert mu is not None  # ("abs", α) comes with "mu" (catalogue records)
    mu_e = sample.expand(mu)
    abs_quantiles, new_q = _track_quantiles(
      sample,
      lambda x: jnp.abs(x - mu_e),
      abs_levels,
      old["online_abs_quantiles"],
      old["online_abs_quantile_scale"],
      r,
      b,
      quantile_step,
    )
    new.update({f"online_abs_{k}": v for k, v in new_q.items()})

  hi = lo = None
  if "online_max" in old:
    has = r > 0
    bmax, bmin = sample.max(), sample.min()
    hi = jnp.where(
      has,
      jnp.maximum(bmax, b * old["online_max"] + r * bmax),
      old["online_max"],
    )
    lo = jnp.where(
      has,
      jnp.minimum(bmin, b * old["online_min"] + r * bmin),
      old["online_min"],
    )
    new["online_max"], new["online_min"] = hi, lo

  trackers = Trackers(mu, quantiles, hi, lo, abs_quantiles)
  center = stat.value(trackers, **measures.statistic_kwargs)
  m = None
  if dev.moment is not None:
    expanded = Trackers(
      None if mu is None else sample.expand(mu),
      {a: sample.expand(q) for a, q in quantiles.items()},
      None,
      None,
      {a: sample.expand(q) for a, q in abs_quantiles.items()},
    )
    phi = lambda v: dev.moment(v, expanded, **measures.deviation_kwargs)
    m = b * old["online_moment"] + r * sample.average(phi)
    new["online_moment"] = m
  dev_sq = dev.dev_sq(m, trackers, **measures.deviation_kwargs)
  if measures.scale != 1.0:
    dev_sq = dev_sq * measures.scale**2
  new = {
    k: lax.stop_gradient(v).astype(jnp.asarray(state[k]).dtype)
    for k, v in new.items()
  }
  return center, dev_sq, new


def online_statistics(
  x: Array,
  state: dict[str, Array],
  *,
  axes: int | Sequence[int],
  statistic: str | None = None,
  deviation: str = "superquantile",
  alpha: float | None = 0.5,
  p: float = 2.0,
  levels: Sequence[float] | None = None,
  weights: Sequence[float] | None = None,
  gaussian_consistent: bool = False,
  momentum: float = 0.99,
  quantile_step: float = DEFAULT_QUANTILE_STEP,
  mask: Array | None = None,
  axis_name: Any = None,
  axis_index_groups: Any = None,
) -> tuple[Array, Array, dict[str, Array]]:
  """The functional form of one online step: ``(center, dev, new_state)``.

  ``state=None`` starts from :func:`init_state`. Arguments as in
  :func:`gbn_jax.batch_statistics`; ``dev`` is D (not D^2).
  """
  from gbn_jax.config import make_measures  # noqa: PLC0415

  measures = make_measures(
    statistic,
    deviation,
    alpha=alpha,
    p=p,
    levels=levels,
    weights=weights,
    gaussian_consistent=gaussian_consistent,
  )
  sample = Sample(
    x,
    axes,
    mask=mask,
    axis_name=axis_name,
    axis_index_groups=axis_index_groups,
  )
  if state is None:
    state = init_state(measures, sample.channel_shape)
  center, dev_sq, new = update(
    measures, state, sample, momentum=momentum, quantile_step=quantile_step
  )
  return center, catalogue._safe_root(dev_sq, 0.5), new
