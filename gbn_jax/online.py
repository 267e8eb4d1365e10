"""Online mode: running estimates of S and D that include the current batch.

In batch mode the training forward pass normalizes with S and D of the batch
alone, which are undefined or useless for a batch of one example (a single
value has D = 0). In online mode it normalizes with *running* estimates that
have just absorbed the current batch (as in Online Normalization, Chiley et
al. 2019, and streaming normalization, Liao, Kawaguchi & Poggio 2016):

    state_t = update(state_{t-1}, batch_t)
    y_t     = scale * (x_t - S(state_t)) / sqrt(D(state_t)^2 + eps) + bias

so every batch size, 1 included, gets a meaningful normalization. Every
update is a few masked, device-pooled averages of the :class:`Sample`, so
masks and ``axis_name`` (pmap / shard_map) work as in batch mode: the result
on N devices equals one device on the concatenated batch.

Notation: β = momentum, r = 1 - β (0 for a channel with no valid value in
the batch, which leaves its state untouched), avg = average over the batch's
valid values (all devices), [t]_+ = max(t, 0).

Running quantities ("trackers"; kept only when the configuration needs them):

* ``online_mu``, the mean:  μ ← β μ + r avg(x).
* ``online_quantiles``, one Robbins–Monro iterate per level α (stacked on a
  leading axis in the order of :func:`quantile_levels`):

      q ← q + η (α - F̂(q)),   F̂(q) = avg(1[x <= q])  (the batch fraction at
                                                       or below q, pooled)
      η = quantile_step · r · s,  s ← β s + r avg|x - q|  (``online_quantile_scale``)

  The step is scaled by a running absolute deviation s around q, so the
  update is scale-equivariant (it behaves the same on λ x) and large while q
  is far from the data. With the default ``quantile_step = π`` this is the
  Newton step at the median of a normal distribution (1/f(q_0.5) = π E|X-q_0.5|),
  i.e. q then relaxes towards the quantile at about the rate r of the mean's
  exponential average. The fixed point of the mean update is F(q) = α.
* ``online_max`` / ``online_min``, decaying extremes:
  M ← max(max(x), β M + r max(x)) (and the same for the minimum): a new batch
  extreme beyond M is taken at once, otherwise M relaxes towards the batch's.
* ``online_moment``, the running mean of the deviation's per-value moment φ
  (below), taken around the *updated* centers: m ← β m + r avg(φ(x)).

Statistics S (catalogue name: online estimate):

* ``mean``: μ.        ``quantile``: q_α.        ``median``: q_0.5.
* ``midrange``: (M + m_min) / 2.        ``mixed_quantile``: Σ_j λ_j q_{α_j}.

Deviations D (φ whose running mean m is kept, then D from m):

* ``std``: φ = (x - μ)^2, D = sqrt(m).
* ``mean_abs``: φ = |x - μ|, D = m.
* ``lp``: φ = |x - μ|^p, D = m^(1/p).
* ``upper_semi`` / ``lower_semi``: φ = [x - μ]_+^2 / [μ - x]_+^2, D = sqrt(m).
* ``median_abs``: φ = |x - q_0.5|, D = m.
* ``superquantile``: the Rockafellar–Uryasev form q̄_α = q + E[(x - q)_+]/(1 - α)
  minus μ, per value: φ = q + [x - q]_+/(1 - α) - x
  = α/(1 - α) [x - q]_+ + [q - x]_+ (written in this second, non-negative
  form), D = m. At any q this is ≥ q̄_α - μ with equality at q = q_α, so an
  error in q enters D only to second order.
* ``mixed_superquantile``: φ = Σ_j λ_j (α_j/(1 - α_j) [x - q_j]_+ + [q_j - x]_+), D = m.
* ``half_range``: no moment, D = (M - m_min) / 2.
* ``abs_superquantile``: with c the tracked level-α quantile of |x - μ|
  (``online_abs_quantiles``, the same Robbins–Monro update applied to
  |x - μ|), φ = c + [|x - μ| - c]_+ / (1 - α), D = m (the Rockafellar–Uryasev
  form again: exact at c = q_α(|X - μ|), second-order error elsewhere).

Gradients (what is and is not differentiated). The forward pass uses S and D
of the updated state; JAX differentiates them through the *current batch's*
contribution only:

* differentiated: r avg(x) in μ; r avg(φ(x)) in the moment, including through
  the updated μ inside φ; the batch max/min in the extremes.
* not differentiated: the previous state (``stop_gradient``: earlier batches
  are constants); the quantile iterates: F̂ is piecewise constant in x, so the
  Robbins–Monro step has derivative 0 almost everywhere and q enters as a
  constant (for the superquantile this is first-order exact at q = q_α,
  where ∂/∂q [q + E(x - q)_+/(1 - α)] = 1 - P(X > q)/(1 - α) = 0); the step
  size η and its scale s. The new state returned for storage carries no
  gradient.

Initial state: μ = 0, q = 0 (also of |x - μ|), s = 1, M = 1, m_min = -1,
moment 1, i.e. S = 0 and D = 1 (half_range: 1), like batch norm's running
averages; there is no bias correction (it would give D = 0 on the first single-example batch).
``use_fast_variance`` has no effect in online mode.
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
  abs_quantiles: dict = {}  # level α -> q_α of |x - μ|


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
    state["online_quantiles"] = jnp.zeros((len(levels),) + shape, dtype)
    state["online_quantile_scale"] = jnp.ones((len(levels),) + shape, dtype)
  abs_levels = abs_quantile_levels(measures)
  if abs_levels:
    state["online_abs_quantiles"] = jnp.zeros((len(abs_levels),) + shape, dtype)
    state["online_abs_quantile_scale"] = jnp.ones(
        (len(abs_levels),) + shape, dtype
    )
  if "extremes" in needs:
    state["online_max"] = jnp.ones(shape, dtype)
    state["online_min"] = -jnp.ones(shape, dtype)
  if measures.deviation_spec.online.moment is not None:
    state["online_moment"] = jnp.ones(shape, dtype)
  return state


def _track_quantiles(sample, transform, levels, qs_old, scales_old, r, b,
                     quantile_step):
  """One Robbins–Monro step per level on the values ``transform(x)``."""
  if not levels:
    return {}, {}
  qs, scales, out = [], [], {}
  for i, a in enumerate(levels):
    q, s = qs_old[i], scales_old[i]
    qe = sample.expand(q)
    below = sample.average(lambda x: (transform(x) <= qe).astype(x.dtype))
    q = q + (quantile_step * r * s) * (a - below)
    qe = sample.expand(q)
    s = b * s + r * sample.average(lambda x: jnp.abs(transform(x) - qe))
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
      sample, lambda x: x, quantile_levels(measures),
      old.get("online_quantiles"), old.get("online_quantile_scale"), r, b,
      quantile_step,
  )
  new.update({f"online_{k}": v for k, v in new_q.items()})
  abs_quantiles = {}
  abs_levels = abs_quantile_levels(measures)
  if abs_levels:
    mu_e = sample.expand(mu)
    abs_quantiles, new_q = _track_quantiles(
        sample, lambda x: jnp.abs(x - mu_e), abs_levels,
        old["online_abs_quantiles"], old["online_abs_quantile_scale"], r, b,
        quantile_step,
    )
    new.update({f"online_abs_{k}": v for k, v in new_q.items()})

  hi = lo = None
  if "online_max" in old:
    has = r > 0
    bmax, bmin = sample.max(), sample.min()
    hi = jnp.where(
        has, jnp.maximum(bmax, b * old["online_max"] + r * bmax), old["online_max"]
    )
    lo = jnp.where(
        has, jnp.minimum(bmin, b * old["online_min"] + r * bmin), old["online_min"]
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
