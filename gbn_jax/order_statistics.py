"""Exact order statistics of a :class:`~gbn_jax.sample.Sample`, by counting.

Everything the catalogue needs from the ordering of a sample goes through
:func:`kth_smallest`; :func:`quantile` adds the rank rule of docs/SPEC.md §2.

The rank rule: ``k = ceil(alpha * n)`` clipped to ``[1, n]`` (NumPy's
``method="inverted_cdf"``). ``alpha`` is taken as a float32 and the product
``alpha * n`` is evaluated in float32, the same way with or without a mask, on
one device or many; counts are exact in float32 up to 2**24 values per
channel. Where ``float32(alpha) * n`` lands within rounding of a whole number,
that float32 product decides ``k`` (NumPy, in float64, may then differ by one).

The engine (selection by counting)
----------------------------------
Each float32 value maps to an int32 *key* that orders like the float:
``key = m`` for ``x >= 0`` and ``-m`` for ``x < 0`` with ``m`` the bits of
``|x|``, so ``-0.0`` and ``+0.0`` share key 0 (they compare equal, as in
``jnp.sort``) and every NaN gets the key after +inf (NaNs sort last, as in
``jnp.sort``). Compares against a bound run on the floats where that is
exact and on the integer keys where it is not (bounds among ±0 and the
denormals, which XLA:CPU compares as zero), so denormals stay exact without
an x-sized key array in the common case. Per channel the engine keeps a
bracket of keys ``(lo, hi]`` with ``c(lo) < k <= c(hi)``,
``c(p) = #{valid x : key(x) <= p}``. A pass

1. counts the values at two per-channel pivots -- one masked sum of
   ``[x <= p_0] + 2**16 [x <= p_1]`` in uint32 while a device holds fewer
   than 2**16 values per channel, two float32 sums otherwise -- ``psum``-ed
   over the devices of ``axis_name``, and keeps the pivots next to rank
   ``k`` as the new bracket;
2. only where counting alone stalls -- an unfinished channel whose count
   ``m = c(hi) - c(lo)`` did not shrink, or with an end at ±inf -- pulls
   both ends in to actual data: the smallest and the largest value in the
   bracket (``pmin``/``pmax``, two more reductions, all channels). No count
   changes, and when the two are equal the bracket holds one distinct value:
   that is ``x_(k)``, and ``c(hi) - c(lo)`` is the number of values tied
   with it. On smooth data most passes skip this step.

A channel is finished when its bracket spans one key, or holds one value
(``m == 1``: that value is ``x_(k)``, tied with none); after the loop one
max over the bracket reads off the values of the latter kind.

The pivots of the first pass are where a normal fit (the sample's mean, and
the spread of a strided subsample of :data:`PIVOT_SUBSAMPLE_SIZE` values)
puts the quantiles at ``t ∓ spread``, inside the data range (the sample's
min and max); afterwards they are placed by linear interpolation of the rank
across the bracket, ``±(sqrt(m f (1 - f)) + 1/4)`` ranks around the target
(``m`` values in the bracket, the target at fraction ``f`` of them) -- fast
on smooth data. From pass ``BISECT_AFTER`` on, one pivot halves the
bracket's key range instead, which bounds the passes on any data
(:func:`max_passes`). The loop (``lax.while_loop``) stops when every channel
is finished.

Warm start
----------
``Sample(quantile_guess={α: g}, spread_guess=s)``: per channel, a guess
``g`` of ``q_α`` (e.g. a layer's running average of it) and of the data's
spread ``s`` (a standard deviation). :func:`quantile` then starts from them:
the first pivots are ``g ∓ δ``, ``δ = WARM_SE · s sqrt(t (1 - t) / n) /
φ(Φ⁻¹(t))`` -- :data:`WARM_SE` standard errors of the sample quantile under
a normal model -- as keys ``(min(key(g - δ), key(g) - 1), max(key(g + δ),
key(g)))`` (``s = 0``: the key of ``g`` and the one below, which finishes a
constant channel equal to ``g`` in one pass). The cold prelude (mean, data
range, subsample spread) is skipped: the bracket starts as the whole key
range, ``c(lo) = 0`` and ``c(hi) = n`` by definition, and a pair that misses
leaves an end at ±inf, which makes that pass snap to the data (two
reductions, what the data range costs cold).

Exactness never depends on the guess: every pass keeps ``c(lo) < k <=
c(hi)``, whatever its pivots, so a far-off guess (or a changed
distribution) costs passes, not correctness. Per channel, a non-finite guess
falls back to the cold normal fit (from the subsample's mean and spread),
and a NaN, ±inf or negative spread (or none) to the subsample's RMS
deviation from the guess; the subsample is read only when some channel
needs it. On steady data the passes are about those of a cold start (the
last channels' end game sets them); what is saved is the prelude.

Across devices the counts of a pass are ``psum``-ed, so every device must
count at the same pivots. The engine makes the guesses identical rather than
requiring it: ``(g, s)``, unusable values first mapped to ``-inf``, are
``pmax``-ed over ``axis_name`` (one C-sized all-reduce per level). Replicated
running averages pass through unchanged; devices that pass different
guesses all start from the largest usable one; a device without a usable
guess takes another's, and a channel cold on every device is cold on all.
The result is exact either way. :func:`quantile_passes` (and
:func:`selection_passes` with ``guess=``) report the passes taken.

No pass gathers activations: communication per call is
``O(channels x passes)``. Under ``jit`` with a sharded batch (no
``axis_name``) XLA inserts the same reductions.

Result on special data: exactly ``jnp.sort(valid values)[k - 1]`` -- ties,
±inf, denormals and masks included; ``-0.0`` comes back as ``+0.0``. A NaN
sorts after ``+inf``, so in a channel with ``j`` NaNs, ``x_(k)`` is NaN
exactly when ``k > n - j`` (and every deviation of that channel is NaN
anyway). Channels never interact: a NaN changes only its own channel. An
empty channel gives 0.

Gradient (docs/SPEC.md §3): ``dx = g * [x == x_(k)] / #{x == x_(k)}`` -- ties
share the unit of gradient, an allowed subgradient; without ties it is the
sort's gradient exactly. It is attached with a ``jax.custom_jvp`` (so forward
mode works too) whose primal is free and whose derivative is elementwise; the
backward needs ``x`` and per-channel values only. The cross-device part of the
gradient goes through the same ``psum`` as every other reduction of the sample,
so ``pmap``/``shard_map`` differentiate it as they differentiate the mean. With
or without a guess the gradient is the same (it depends on ``x_(k)`` and its
ties only).


Approximate mode (``Sample(approximate=True)``)
-----------------------------------------------
The same search -- from the guess where guess and spread are usable, else
from the data range alone (a normal fit to the sample's min and max) --
stopped as soon as every channel's last pass straddled the
target (``c(p_0) < k <= c(p_1)`` for two of its pivots) with at most ``M =
APPROX_BRACKET_SE sqrt(n t (1 - t))`` values in the bracket, ``t = (k - 1/2)
/ n`` (or the channel is finished exactly); its later pairs span at least
``±M / 4`` ranks, so that one more pass usually straddles. ``q̂_α`` is then the
rank interpolation ``a + (b - a)(k - c(lo) - 1/2) / m`` across the final
bracket ``(lo, hi] = (a, b]`` holding ``m`` values (``hi`` itself where the
bracket is one key or one value). In steady state (a guess within a few
standard errors) that is one counting pass, no mean, no data range. The
bound, per channel, on any data (heavy tails, skew, ties, masks, any guess):

- rank: ``c(lo) <= #{x <= q̂} <= c(hi)`` with ``c(lo) < k <= c(hi)``, so
  ``|#{x <= q̂} - k| <= m`` and ``|F_n(q̂) - α| < (m + 1) / n`` (``F_n``
  the empirical CDF), with ``m <= M``, i.e. ``|F_n(q̂) - α| <
  APPROX_BRACKET_SE sqrt(t (1 - t) / n) + 2 / n``, unless ``q̂ = x_(k)``
  exactly (a bracket of one key: its ties); ``m`` is returned by
  :func:`approximate_bracket`. With a continuous
  density the interpolation is much closer: about ``sqrt(m) / 2`` ranks,
  a fraction of a standard error of the quantile itself.
- superquantile: the Rockafellar–Uryasev value at ``q̂``, ``RU(q̂) = q̂ +
  Σ[x - q̂]_+ / ((1 - α) n)``, satisfies ``0 <= RU(q̂) - q̄_α <= |q̂ - q_α|
  |F_n(q̂) - α| / (1 - α)`` -- an upper bound, second order: the value error
  times the rank error. (``RU'(c) = (F_n(c) - α) / (1 - α)`` is
  nondecreasing, ``< 0`` below ``q_α`` and ``>= 0`` from ``q_α`` on, and
  between ``q_α`` and ``q̂`` it lies between 0 and its value at ``q̂``;
  integrate it from ``q_α`` to ``q̂``.)

Gradient: that of the mean of the ``m`` values in the final bracket,
``g [lo < x <= hi] / m`` (a smoothed ``[x == x_(k)]``; the same where the
bracket holds one value or one key): it sums to 1 per channel, like the
exact quantile's, so a shift of the whole channel still cancels in the
gradient. Only exactly pooled quantities place the pivots (counts, the
min and max, the ``pmax``-ed guess; no mean or subsample, whose float sums
round differently from one device count or program to another), so the
final bracket is the same on every device and equals the one-device bracket
on the concatenated batch: q̂ is the one-device value (the interpolation may
round by an ulp differently in another program).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

from gbn_jax.sample import Sample

Array = jax.Array

P_INTERP = 2
"""Pivots counted in each pass."""

SPREAD = 0.05
"""Cold first pass: the levels t ∓ SPREAD sqrt(t (1 - t)) of a normal fit."""

RANGE_SPREAD = 0.15
"""The approximate mode's cold first pass: levels t ∓ RANGE_SPREAD sqrt(t (1 -
t)) of a normal fit to the data range (a rougher fit than the mean's, so a
wider pair: it straddles, and the next pass narrows)."""

WARM_SE = 4.0
"""Warm first pass: pivots at the guess ∓ WARM_SE standard errors of the
sample quantile (normal model with the guessed spread). A miss in any one
of C channels costs every channel a pass, so the pair is wide: a guess off
by the batch-to-batch noise alone (about one standard error) is outside it
with probability ~6e-5 per channel."""

HALF = 1.0
"""Later pivots: ranks ±(HALF sqrt(m f (1 - f)) + 1/4) around the target
(m values in the bracket, f the target's fraction of them)."""

BISECT_AFTER = 6
"""From this pass on, the last pivot halves the key range (worst-case bound)."""

APPROX_BRACKET_SE = 16.0
"""Approximate mode: stop once the bracket holds at most this many standard
errors of the sample quantile, ``APPROX_BRACKET_SE sqrt(n t (1 - t))``
values (``t = (k - 1/2) / n``), then interpolate (the rank-error bound)."""

PIVOT_SUBSAMPLE_SIZE = 1024
"""Values per channel (per device) behind the cold first pass's spread
estimate (and a warm start's, where the spread guess is unusable)."""

_MAX_KEY = 2**31 - 1
_MIN_KEY = -(2**31)  # below every key
_INF_KEY = 0x7F800000  # key of +inf; -inf has -_INF_KEY
_NAN_KEY = _INF_KEY + 1  # every NaN: after +inf, as jnp.sort puts it


# --------------------------------------------------------------------------
# Rank rule.
# --------------------------------------------------------------------------


def quantile_rank(alpha: float, n: Array) -> Array:
  """k = ceil(alpha * n) clipped to [1, max(n, 1)], int32 (float32 product)."""
  n = jnp.asarray(n, jnp.float32)
  k = jnp.ceil(jnp.float32(alpha) * n)
  k = jnp.clip(k, 1.0, jnp.maximum(n, 1.0))
  return k.astype(jnp.int32)


# --------------------------------------------------------------------------
# Order-preserving keys.
# --------------------------------------------------------------------------


def float_to_key(x: Array) -> Array:
  """int32 key ordering like float32 ``x``: ±0 -> 0, every NaN -> after +inf.

  Integer compares also keep denormals exact where the CPU's float compares
  treat them as zero.
  """
  b = lax.bitcast_convert_type(x.astype(jnp.float32), jnp.int32)
  m = b & 0x7FFFFFFF
  key = jnp.where(b < 0, -m, m)
  return jnp.where(m > _INF_KEY, _NAN_KEY, key)


def key_to_float(key: Array) -> Array:
  """Inverse of :func:`float_to_key` (key 0 -> +0.0; out-of-range keys clip)."""
  key = jnp.clip(key, -_INF_KEY, _NAN_KEY)
  b = jnp.where(key < 0, (-key) | jnp.int32(_MIN_KEY), key)
  return lax.bitcast_convert_type(b, jnp.float32)


def max_passes() -> int:
  """Worst-case number of passes of :func:`_select`.

  From pass ``BISECT_AFTER`` on every pass halves the bracket's key range
  (at most 2**32 keys) until one key is left: 1 + BISECT_AFTER + 33 passes
  at most (two to four reductions each, plus one at the end).
  """
  return 1 + BISECT_AFTER + 33


# --------------------------------------------------------------------------
# Sample plumbing.
# --------------------------------------------------------------------------


def _channels_last(sample: Sample, values: Array) -> Array:
  """Move the reduction axes to the end and flatten them: (*channels, m)."""
  keep = [i for i in range(values.ndim) if i not in sample.axes]
  values = jnp.transpose(values, keep + list(sample.axes))
  return values.reshape((*sample.channel_shape, -1))


def _axes_lead(sample: Sample) -> bool:
  """Whether the reduction axes come first (channels-last layouts, NHWC)."""
  return list(sample.axes) == list(range(len(sample.axes)))


def _reduction_first(sample: Sample, values: Array) -> Array:
  """Move the reduction axes to the front and flatten them: (m, *channels).

  Free (a reshape) for channels-last layouts such as NHWC.
  """
  if not _axes_lead(sample):
    rest = [i for i in range(values.ndim) if i not in sample.axes]
    values = jnp.transpose(values, list(sample.axes) + rest)
  return values.reshape((-1, *sample.channel_shape))


def _subsample(sample: Sample, size: int):
  """A strided subsample of at most ``size`` slots per channel (local).

  Returns ``(values, valid)`` of shape ``(m, *channels)``; ``valid`` is None
  without a mask. Strided over the flattened reduction axes, so it spreads
  over the batch and the spatial positions.
  """
  x = _reduction_first(sample, sample.x)
  stride = max(1, -(-x.shape[0] // size))
  x = x[::stride]
  valid = None
  if sample.mask is not None:
    valid = _reduction_first(sample, sample.mask)[::stride]
  return x, valid


# --------------------------------------------------------------------------
# The selection loop.
# --------------------------------------------------------------------------
#
# XLA:CPU notes (measured, see BENCHMARKS.md): a fusion comparing x with
# many per-channel pivots at once (a broadcast (N, C, P) comparison, or many
# sibling sums fused into one multi-output reduction) ran 10-100x slower per
# comparison than a single-output reduction. A comparison is not folded into
# the reduction (XLA:CPU writes the 0/1 values out first), so a pass packs
# its two comparisons into one uint32 sum (over the flattened (m, C) view
# for channels-last layouts): about the cost of one float32 count. The
# bracket's extremes are float32 min/max.


def _keys(sample: Sample) -> Array:
  return float_to_key(lax.stop_gradient(sample.x))


def _values(sample: Sample) -> Array:
  return lax.stop_gradient(sample.x).astype(jnp.float32)


# Keys with |key| < 2**23 are ±0 and the denormals. XLA:CPU compares floats
# with denormals-are-zero, so a float compare against a bound in that band
# can be wrong; against any other bound (normal or ±inf) it is exact (a
# denormal read as ±0 lies on the same side of it). The fast paths below
# compare floats -- no x-sized key array -- and fall back to the integer keys
# when a bound or result lies in the band.
_ZERO_BAND = 0x00800000


def _in_band(key: Array) -> Array:
  return jnp.any(jnp.abs(key) < _ZERO_BAND)


def _reduce_le(sample: Sample, pivots: Array, reduce, view=None) -> Array:
  """``reduce(le_0, le_1, ...)``, ``le_j = [x <= p_j]`` for pivot keys
  ``pivots`` (*C, P), each ``le_j`` broadcast to x (or to ``view(x)``).

  Compares floats, or the integer keys where a pivot lies in the zero band.
  ``view`` reshapes x-shaped arrays (``None``: as they are); the pivots are
  expanded to match.
  """
  if view is None:
    view = lambda v: v
    p = jnp.expand_dims(pivots, sample.axes)
  else:
    p = pivots[None]
  ps = [p[..., j] for j in range(pivots.shape[-1])]

  # The float bounds are computed here, outside the branches: inside,
  # XLA:CPU fused their per-channel arithmetic into the comparison loop,
  # recomputing it for every element (seen in the compiled step).
  pfs = [key_to_float(pj) for pj in ps]

  def by_key(_):
    key = view(_keys(sample))
    return reduce(*[key <= pj for pj in ps])

  def by_float(_):
    x = view(_values(sample))
    return reduce(*[x <= pf for pf in pfs])

  return lax.cond(_in_band(pivots), by_key, by_float, None)


def _count_le(sample: Sample, pivot: Array) -> Array:
  """c(p) = #{valid x : key(x) <= p} per channel, float32 (exact < 2**24).

  ``pivot`` lies in [-_INF_KEY, _INF_KEY] (NaNs never count).
  """

  def count(le):
    return jnp.sum(le.astype(jnp.float32), sample.axes, where=sample.mask)

  return sample.psum(_reduce_le(sample, pivot[..., None], count))


_PACK_BITS = 16
"""Two counts share one uint32 sum (low and high 16 bits) while every
device holds fewer than 2**16 slots per channel."""


def _count_pair_packed(sample: Sample, pivots: Array) -> Array:
  """(c(p_0), c(p_1)) in one reduction: Σ [x <= p_0] + 2**16 [x <= p_1].

  Exact while each local count is below 2**16 (the caller checks the
  slots per device); the halves are split before the ``psum``. On XLA:CPU
  one packed uint32 count measured about the cost of one float32 count
  (0.13-0.2 ms against 0.23-0.49 ms for two, at 1M values).
  """
  # Where the reduction axes lead (channels last), over one flattened axis:
  # an integer sum over several axes took a slow path (measured 2x slower).
  # Otherwise over the axes as they are (a transpose per pass would cost
  # more than it saves).
  view, axes = None, sample.axes
  if _axes_lead(sample):
    view, axes = functools.partial(_reduction_first, sample), (0,)
  mask = sample.mask
  if mask is not None and view is not None:
    mask = view(mask)

  def packed(le0, le1):
    v = le0.astype(jnp.uint32) + (le1.astype(jnp.uint32) << _PACK_BITS)
    return jnp.sum(v, axes, where=mask, dtype=jnp.uint32)

  both = _reduce_le(sample, pivots, packed, view)
  low = both & jnp.uint32(2**_PACK_BITS - 1)
  high = both >> _PACK_BITS
  counts = jnp.stack([low, high], -1).astype(jnp.float32)
  return sample.psum(counts)


def _counts(sample: Sample, pivots: Array) -> Array:
  """c(p_j) for pivots (*C, P), P small."""
  if pivots.shape[-1] == 2 and sample.local_size < 2**_PACK_BITS:
    return _count_pair_packed(sample, pivots)
  return jnp.stack(
    [_count_le(sample, pivots[..., j]) for j in range(pivots.shape[-1])],
    -1,
  )


def _extreme_in(sample: Sample, lo: Array, hi: Array, largest: bool) -> Array:
  """Smallest (or largest) key in (lo, hi] per channel (hi / lo + 1 if none).

  A float32 min/max, exact unless a bound or the result lies in the zero
  band (see above): then the integer keys decide (slower; such data only).
  """
  lo_e = jnp.expand_dims(lo, sample.axes)
  hi_e = jnp.expand_dims(hi, sample.axes)

  def by_key(_):
    key = _keys(sample)
    inside = (key > lo_e) & (key <= hi_e)
    if sample.mask is not None:
      inside = inside & sample.mask
    if largest:
      return jnp.max(jnp.where(inside, key, _MIN_KEY), sample.axes)
    return jnp.min(jnp.where(inside, key, _MAX_KEY), sample.axes)

  # Per-channel float bounds, computed outside the branches (inside, XLA:CPU
  # recomputed them for every element; see _reduce_le). lo below -inf / hi
  # at NaN: no bound on that side.
  lo_f, lo_open = key_to_float(lo_e), lo_e < -_INF_KEY
  if largest:
    # NaN (the largest key) counts when hi admits it: max propagates it.
    hi_f, hi_open = key_to_float(hi_e), hi_e > _INF_KEY
  else:
    # NaN would win a min: leave it out; +inf is then ambiguous (below).
    hi_f, hi_open = key_to_float(jnp.minimum(hi_e, _INF_KEY)), None

  def by_float(_):
    x = _values(sample)
    above = (x > lo_f) | lo_open
    below = x <= hi_f
    inside = above & (below if hi_open is None else below | hi_open)
    if sample.mask is not None:
      inside = inside & sample.mask
    if largest:
      v = jnp.max(jnp.where(inside, x, -jnp.inf), sample.axes)
    else:
      v = jnp.min(jnp.where(inside, x, jnp.inf), sample.axes)
    return float_to_key(v)

  def reduce(key):
    return sample.pmax(key) if largest else sample.pmin(key)

  bounds_in_band = _in_band(jnp.clip(lo, -_INF_KEY, _INF_KEY)) | _in_band(
    jnp.clip(hi, -_INF_KEY, _INF_KEY)
  )
  key = reduce(lax.cond(bounds_in_band, by_key, by_float, None))
  ambiguous = _in_band(key)
  if not largest:
    ambiguous = ambiguous | jnp.any(key == _INF_KEY)
  key = lax.cond(ambiguous, lambda _: reduce(by_key(None)), lambda _: key, None)
  return jnp.clip(key, lo + 1, hi)


def _count_step(sample, k, lo, hi, c_lo, c_hi, pivots):
  """Counts at the pivots; keeps the pivots next to rank k as the bracket.

  Returns (lo, hi, c_lo, c_hi, hit), ``hit`` where the target fell between
  two of these pivots (both ends are fresh counts). Two reductions: the ends
  stay where the counts put them (not pulled in to data, see :func:`_snap`).
  """
  counts = _counts(sample, pivots)
  below = counts < k[..., None]
  hit = jnp.any(below, -1) & jnp.any(~below, -1)
  lo_new = jnp.max(jnp.where(below, pivots, _MIN_KEY), -1)
  c_lo_new = jnp.max(jnp.where(below, counts, -1.0), -1)
  hi_new = jnp.min(jnp.where(below, _MAX_KEY, pivots), -1)
  c_hi_new = jnp.min(jnp.where(below, jnp.inf, counts), -1)
  take_lo = lo_new > lo
  lo, c_lo = jnp.where(take_lo, lo_new, lo), jnp.where(take_lo, c_lo_new, c_lo)
  take_hi = hi_new < hi
  hi, c_hi = jnp.where(take_hi, hi_new, hi), jnp.where(take_hi, c_hi_new, c_hi)
  return lo, hi, c_lo, c_hi, hit


def _snap(sample, lo, hi):
  """Pulls both ends in to actual data: (mn - 1, mx), mn/mx the smallest and
  largest key in (lo, hi]. No count changes (no valid key lies in (lo, mn)
  or (mx, hi]); ``mn == mx`` means the bracket holds one distinct value.
  Two reductions, so the loop does it only where counting alone stalls."""
  mn = _extreme_in(sample, lo, hi, largest=False)
  mx = _extreme_in(sample, lo, hi, largest=True)
  return mn - 1, mx


def _done(lo, hi, c_lo, c_hi):
  # One key left, or one value left (then it is x_(k), and tied with none).
  return (lo + 1 == hi) | (c_hi - c_lo <= 1)


def _unbounded(lo, hi):
  # An end at ±inf or beyond: interpolating towards it places no pivot well.
  finite = _INF_KEY - 1
  return (lo < -finite) | (hi > finite)


def _next_pivots(k, lo, hi, c_lo, c_hi, bisect, min_half=None):
  """P_INTERP keys by rank interpolation across the bracket (the last one:
  the key midpoint when ``bisect``); ``min_half``: a floor on the pair's
  half-width in ranks (per channel; the approximate mode's wide pairs)."""
  finite = _INF_KEY - 1
  a = key_to_float(jnp.clip(lo, -finite, finite))  # c(a) = c_lo
  b = key_to_float(jnp.clip(hi, -finite, finite))  # c(b) = c_hi
  m = jnp.maximum(c_hi - c_lo, 1.0)
  # The m values in (a, b], as if spread evenly: rank j sits at fraction
  # (j - 1/2) / m; the target is rank r = k - c_lo.
  r = k - c_lo
  # ±(HALF sd + 1/4) ranks, sd = sqrt(m f (1 - f)) the binomial spread of
  # the rank at fraction f (about the rank error of an interpolated value):
  # the target usually falls between the pivots, and the pair shrinks with
  # the bracket (wider pairs stall when m is small: measured, more passes).
  fr = jnp.clip((r - 0.5) / m, 0.0, 1.0)
  half = HALF * jnp.sqrt(m * fr * (1.0 - fr)) + 0.25
  if min_half is not None:
    half = jnp.maximum(half, min_half)
  j = jnp.linspace(-1.0, 1.0, P_INTERP, dtype=jnp.float32)
  f = (r[..., None] - 0.5 + half[..., None] * j) / m[..., None]
  f = jnp.clip(f, 0.0, 1.0)
  # a (1 - f) + b f: no overflow where b - a would.
  v = a[..., None] * (1.0 - f) + b[..., None] * f
  piv = float_to_key(v)
  lo_u = lax.bitcast_convert_type(lo, jnp.uint32)
  width = lax.bitcast_convert_type(hi, jnp.uint32) - lo_u
  mid = lax.bitcast_convert_type(lo_u + width // 2, jnp.int32)
  piv = piv.at[..., -1].set(jnp.where(bisect, mid, piv[..., -1]))
  # Below lo + 1 or at hi a pivot tells nothing: keep them in [lo + 1, hi - 1].
  piv = jnp.clip(piv, lo[..., None] + 1, hi[..., None] - 1)
  return jnp.clip(piv, -_INF_KEY, _INF_KEY)


def _pass(sample, k, lo, hi, c_lo, c_hi, pivots):
  """One pass: count at the pivots; snap the ends to data where needed.

  Returns (lo, hi, c_lo, c_hi, hit) (``hit``: see :func:`_count_step`).

  The snap (two more reductions) runs only when some unfinished channel has
  an end at ±inf (interpolation is blind there) or made no progress in
  count (the bracket holds only copies of one value, or the data is so
  uneven that the pivots missed): it then ends a tie, or gives the next
  interpolation real end points. On smooth data most passes skip it.
  """
  m_old = c_hi - c_lo
  lo, hi, c_lo, c_hi, hit = _count_step(sample, k, lo, hi, c_lo, c_hi, pivots)
  open_ = ~_done(lo, hi, c_lo, c_hi)
  need = open_ & (_unbounded(lo, hi) | (c_hi - c_lo >= m_old))
  lo, hi = lax.cond(
    jnp.any(need), lambda: _snap(sample, lo, hi), lambda: (lo, hi)
  )
  return lo, hi, c_lo, c_hi, hit


def _data_range(sample: Sample):
  """A first bracket (lo, hi] holding every valid value: the sample's min and
  max (shared with the mean's rounding guard, so free), which spares a snap
  where the first pivots miss the target.

  Falls back to the whole key range where the float min/max may not be the
  keys' (NaN, or a result among ±0 and the denormals, which XLA:CPU
  compares as zero) -- there c(lo) = 0 and c(hi) = n must still hold.
  """
  mn = float_to_key(lax.stop_gradient(sample.min()))
  mx = float_to_key(lax.stop_gradient(sample.max()))
  unsure = lambda key: (jnp.abs(key) < _ZERO_BAND) | (key > _INF_KEY)
  lo = jnp.where(unsure(mn), _MIN_KEY, mn - 1)
  hi = jnp.where(unsure(mx), _NAN_KEY, mx)
  return lo, hi


def _subsample_sample(sample: Sample) -> Sample:
  """The strided subsample (:data:`PIVOT_SUBSAMPLE_SIZE` slots per channel
  and device) as a pooled Sample of its own, without gradient."""
  xs, valid = _subsample(sample, PIVOT_SUBSAMPLE_SIZE)
  # Sum, then divide (overflow_safe=False): a guess needs no overflow guard,
  # and a 1/n multiply here shared its broadcast with the tail sum's, which
  # XLA:CPU then wrote out as an x-sized buffer (seen in the compiled step).
  return Sample(
    lax.stop_gradient(xs).astype(jnp.float32),
    (0,),
    mask=valid,
    axis_name=sample.axis_name,
    axis_index_groups=sample.axis_index_groups,
    overflow_safe=False,
  )


def _subsample_sigma(sample: Sample, mu: Array) -> Array:
  """RMS deviation from ``mu`` over a strided subsample (pooled over devices).

  About 2% relative error at PIVOT_SUBSAMPLE_SIZE = 1024 values: well inside
  the first pass's SPREAD on normal data; on other data the counts decide.
  """
  var = _subsample_sample(sample).average(lambda x: jnp.square(x - mu))
  return jnp.sqrt(jnp.maximum(var, 0.0))


def _subsample_moments(sample: Sample):
  """(mean, RMS deviation from it) of the strided subsample (pooled)."""
  sub = _subsample_sample(sample)
  mu = sub.average(lambda x: x)
  var = sub.average(lambda x: jnp.square(x - mu))
  return mu, jnp.sqrt(jnp.maximum(var, 0.0))


def _normal_fit_pivots(k, n, mu, sigma):
  """Cold first pivots: where N(mu, sigma²) puts the levels t ∓ spread,
  t = (k - 1/2) / n. Only a guess -- the counts decide."""
  t = (k - 0.5) / jnp.maximum(n, 1.0)
  spread = SPREAD * jnp.sqrt(t * (1 - t)) + 0.5 / jnp.maximum(n, 1.0)
  f = t[..., None] + spread[..., None] * jnp.array([-1.0, 1.0])
  z = jax.scipy.special.ndtri(jnp.clip(f, 1e-7, 1 - 1e-7))
  guess = mu[..., None] + sigma[..., None] * z
  return jnp.clip(float_to_key(guess), -_INF_KEY, _INF_KEY)


def _quantile_se(spread, n, t):
  """Standard error of the sample t-quantile, in value units, for normal
  data of standard deviation ``spread``: spread sqrt(t (1-t) / n) / φ(z_t).

  (Asymptotic; |z_t| is capped at 5, beyond which the first bracket is wide
  anyway.)
  """
  z = jnp.clip(jax.scipy.special.ndtri(jnp.clip(t, 1e-7, 1 - 1e-7)), -5, 5)
  density = jnp.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)
  return spread * jnp.sqrt(t * (1 - t) / jnp.maximum(n, 1.0)) / density


def _shared_guess(sample: Sample, guess: Array):
  """(g, s): the guess of x_(k) and the spread guess, identical on every
  device of the group; ``-inf`` marks an unusable value.

  Unusable: a non-finite guess; a NaN, ±inf or negative spread (or none).
  The counts of a pass are summed over the devices, so every device must
  count at the same pivots: a ``pmax`` over the group (one C-sized
  collective) makes the guesses identical whatever each device passed --
  replicated running averages pass through unchanged, and a device without
  a usable guess takes another device's.
  """
  g = lax.stop_gradient(jnp.asarray(guess, jnp.float32))
  g = jnp.broadcast_to(g, sample.channel_shape)
  g = jnp.where(jnp.isfinite(g), g, -jnp.inf)
  s = sample.spread_guess
  if s is None:
    s = jnp.full(sample.channel_shape, -jnp.inf, jnp.float32)
  s = jnp.where(jnp.isfinite(s) & (s >= 0), s, -jnp.inf)
  if sample.axis_name is not None:
    g, s = lax.pmax(
      jnp.stack([g, s]),
      sample.axis_name,
      axis_index_groups=sample.axis_index_groups,
    )
  return g, s


def _guess_pivots(k, n, g, spread):
  """The pair around a guess: ``g ∓ WARM_SE`` standard errors, as keys
  ``(min(key(g - δ), key(g) - 1), max(key(g + δ), key(g)))``."""
  t = (k - 0.5) / jnp.maximum(n, 1.0)
  delta = WARM_SE * _quantile_se(spread, n, t)
  below = jnp.minimum(float_to_key(g - delta), float_to_key(g) - 1)
  above = jnp.maximum(float_to_key(g + delta), float_to_key(g))
  return jnp.clip(jnp.stack([below, above], -1), -_INF_KEY, _INF_KEY)


def _warm_pivots(sample: Sample, k, n, guess):
  """First pivots of an exact warm start (:func:`_guess_pivots`).

  Per channel, where the guess is unusable the cold normal fit takes over,
  and where the spread is, the RMS deviation of the strided subsample from
  the guess; that subsample is read only when some channel needs it (a
  ``lax.cond`` on an identical predicate on every device). A spread of 0
  makes the pair (key(g) - 1, key(g)): a constant channel equal to its
  guess is finished by the first pass.
  """
  g, s = _shared_guess(sample, guess)
  ok_g = g > -jnp.inf
  ok_s = s > -jnp.inf
  zeros = jnp.zeros(sample.channel_shape, jnp.float32)
  if sample.spread_guess is None:
    mu_s, sigma_s = _subsample_moments(sample)
  else:
    mu_s, sigma_s = lax.cond(
      jnp.any(~(ok_g & ok_s)),
      lambda: _subsample_moments(sample),
      lambda: (zeros, zeros),
    )
  center = jnp.where(ok_g, g, mu_s)
  # Spread unknown: the RMS deviation from the guess (>= the data's sd).
  rms = jnp.sqrt(jnp.square(sigma_s) + jnp.square(jnp.where(ok_g, g - mu_s, 0)))
  warm = _guess_pivots(k, n, center, jnp.where(ok_s, s, rms))
  cold = _normal_fit_pivots(k, n, mu_s, sigma_s)
  return jnp.where(ok_g[..., None], warm, cold)


def _min_max_unmemoized(sample: Sample):
  """The pooled min and max, without the sample's memo (inside a
  ``lax.cond`` branch, where the memo must not be filled)."""
  x = lax.stop_gradient(sample.x).astype(jnp.float32)
  mn = jnp.min(x, sample.axes, where=sample.mask, initial=jnp.inf)
  mx = jnp.max(x, sample.axes, where=sample.mask, initial=-jnp.inf)
  if sample.axis_name is not None:
    groups = sample.axis_index_groups
    mn = lax.pmin(mn, sample.axis_name, axis_index_groups=groups)
    mx = lax.pmax(mx, sample.axis_name, axis_index_groups=groups)
  return mn, mx


def _range_start(sample: Sample, k, n, tolerance):
  """(lo, hi, pivots) from the data range alone: the bracket (min, max]
  and a normal fit to it -- midrange, and half range over the expected
  largest standard score of n normal values, Φ⁻¹(1 - 1/(2n)) -- at the
  levels t ∓ max(RANGE_SPREAD sqrt(t (1 - t)), tolerance / (2n))."""
  mn, mx = _min_max_unmemoized(sample)
  mn_key, mx_key = float_to_key(mn), float_to_key(mx)
  # Where the float min/max may not be the keys' (NaN, ±0 and denormals,
  # which XLA:CPU compares as zero): the whole key range.
  unsure = lambda key: (jnp.abs(key) < _ZERO_BAND) | (key > _INF_KEY)
  lo = jnp.where(unsure(mn_key) | (mn_key == _INF_KEY), _MIN_KEY, mn_key - 1)
  hi = jnp.where(unsure(mx_key) | (mx_key == -_INF_KEY), _NAN_KEY, mx_key)
  n1 = jnp.maximum(n, 1.0)
  z_max = jax.scipy.special.ndtri(jnp.clip(1 - 0.5 / n1, 0.5, 1 - 1e-7))
  finite = jnp.finfo(jnp.float32).max
  mn, mx = jnp.clip(mn, -finite, finite), jnp.clip(mx, -finite, finite)
  mid = mn / 2 + mx / 2
  sigma = (mx / 2 - mn / 2) / jnp.maximum(z_max, 0.5)
  t = (k - 0.5) / n1
  width = jnp.maximum(
    RANGE_SPREAD * jnp.sqrt(t * (1 - t)), tolerance / (2 * n1)
  )
  f = t[..., None] + width[..., None] * jnp.array([-1.0, 1.0])
  z = jax.scipy.special.ndtri(jnp.clip(f, 1e-7, 1 - 1e-7))
  pivots = float_to_key(mid[..., None] + sigma[..., None] * z)
  pivots = jnp.clip(pivots, lo[..., None] + 1, hi[..., None] - 1)
  return lo, hi, jnp.clip(pivots, -_INF_KEY, _INF_KEY)


def _approximate_start(sample: Sample, k, n, guess, tolerance):
  """First bracket and pivots of the approximate mode: (lo, hi, pivots).

  From the guess where guess and spread are usable (bracket: the whole key
  range); elsewhere from the data range alone (:func:`_range_start`). Only
  exactly pooled quantities (counts, min, max, the pmax-ed guess) place the
  pivots -- no mean or subsample, whose float sums round differently on
  another device count or in another program -- so the final bracket is
  the same on any number of devices.
  """
  shape = sample.channel_shape
  if guess is None:
    return _range_start(sample, k, n, tolerance)
  g, s = _shared_guess(sample, guess)
  ok = (g > -jnp.inf) & (s > -jnp.inf)
  warm = _guess_pivots(k, n, jnp.where(ok, g, 0.0), jnp.where(ok, s, 0.0))
  full = (
    jnp.full(shape, _MIN_KEY, jnp.int32),
    jnp.full(shape, _NAN_KEY, jnp.int32),
    warm,
  )
  lo, hi, cold = lax.cond(
    jnp.any(~ok), lambda: _range_start(sample, k, n, tolerance), lambda: full
  )
  ok_e = ok[..., None]
  return (
    jnp.where(ok, full[0], lo),
    jnp.where(ok, full[1], hi),
    jnp.where(ok_e, warm, cold),
  )


def _search(sample: Sample, k: Array, guess, tolerance=None):
  """The counting passes: the bracket (lo, hi, c_lo, c_hi), k, n, passes.

  Runs until every channel is finished (:func:`_done`), or -- with a
  ``tolerance`` (per-channel number of values) -- until every bracket is
  finished or holds at most that many values between two pivots of its last
  pass (the approximate mode). The
  bracket invariant c(lo) < k <= c(hi) holds throughout, whatever the
  pivots (which is why a guess cannot change the result). No gradient.
  """
  shape = sample.channel_shape
  n = sample.count().astype(jnp.float32)
  k = jnp.broadcast_to(jnp.asarray(k, jnp.int32), shape).astype(jnp.float32)
  empty = n == 0

  if tolerance is not None:
    lo, hi, pivots = _approximate_start(sample, k, n, guess, tolerance)
  elif guess is None:
    # Cold: a normal fit with the sample's mean (shared with the deviation)
    # and a subsample's spread (a full pass over x for a guess cost ~1/5 of
    # a BN step; measured), inside the data range.
    mu = lax.stop_gradient(sample.mean()).astype(jnp.float32)
    sigma = _subsample_sigma(sample, mu)
    pivots = _normal_fit_pivots(k, n, mu, sigma)
    lo, hi = _data_range(sample)
  else:
    # Warm: no mean, no data range -- the whole key range, c(lo) = 0 and
    # c(hi) = n by definition. If the pivots miss, the ±inf end makes the
    # pass snap to the data (what the data range would have cost anyway).
    pivots = _warm_pivots(sample, k, n, guess)
    lo = jnp.full(shape, _MIN_KEY, jnp.int32)
    hi = jnp.full(shape, _NAN_KEY, jnp.int32)
  lo, hi, c_lo, c_hi, hit = _pass(
    sample, k, lo, hi, jnp.zeros_like(n), n, pivots
  )
  # An empty channel: bracket (-1, 0] -> value 0.
  lo = jnp.where(empty, -1, lo)
  hi = jnp.where(empty, 0, hi)
  c_lo = jnp.where(empty, 0.0, c_lo)
  c_hi = jnp.where(empty, 0.0, c_hi)

  def finished(lo, hi, c_lo, c_hi, hit):
    done = _done(lo, hi, c_lo, c_hi)
    if tolerance is not None:
      # Small enough to interpolate in, and both ends fresh counts around
      # the target (not a pivot and a far data extreme after a miss).
      done = done | (hit & (c_hi - c_lo <= tolerance))
    return done

  # The approximate mode's pairs span half the tolerance: after a miss the
  # next pass likely straddles the target with a bracket that is small
  # enough (narrow exact-mode pairs straddle ~2/3 of the time, and one
  # channel in C that misses costs every channel a pass).
  min_half = None if tolerance is None else tolerance / 4

  limit = max_passes()

  def cond(state):
    *bracket, i = state
    return jnp.any(~finished(*bracket)) & (i < limit)

  def body(state):
    lo, hi, c_lo, c_hi, _, i = state
    pivots = _next_pivots(k, lo, hi, c_lo, c_hi, i >= BISECT_AFTER, min_half)
    lo, hi, c_lo, c_hi, hit = _pass(sample, k, lo, hi, c_lo, c_hi, pivots)
    return lo, hi, c_lo, c_hi, hit, i + 1

  lo, hi, c_lo, c_hi, _, passes = lax.while_loop(
    cond, body, (lo, hi, c_lo, c_hi, hit, jnp.int32(1))
  )
  return lo, hi, c_lo, c_hi, k, n, passes


def _select(sample: Sample, k: Array, guess=None):
  """(value of x_(k), its key, 1 / ties, ties #{x == x_(k)}, passes) per
  channel; no gradient.

  ``guess``: a per-channel guess of x_(k) (warm start), or None.
  """
  lo, hi, c_lo, c_hi, _, _, passes = _search(sample, k, guess)
  # A channel that ended with one value in a wider key range: that value is
  # x_(k) -- the largest (only) one in (lo, hi]. One reduction, all channels.
  # The value is converted inside the branches: XLA:CPU fused per-channel
  # arithmetic after the cond (key/float conversions, clips) into every
  # x-sized consumer of the value -- tail sum, normalization, backward --
  # recomputing it per element (seen in the compiled step: about one BN
  # step of time for the approximate mode's interpolation); a conditional's
  # outputs are computed once.
  ties = c_hi - c_lo

  def result(key):
    inv_ties = (1.0 / jnp.maximum(ties, 1)).astype(sample.x.dtype)
    return key_to_float(key).astype(sample.x.dtype), key, inv_ties

  value, key, inv_ties = lax.cond(
    jnp.any(lo + 1 != hi),
    lambda: result(_extreme_in(sample, lo, hi, largest=True)),
    lambda: result(hi),
  )
  return value, key, inv_ties, ties, passes


def _approximate_tolerance(k, n):
  """Values a finished approximate bracket may hold (see APPROX_BRACKET_SE)."""
  t = (k - 0.5) / jnp.maximum(n, 1.0)
  return APPROX_BRACKET_SE * jnp.sqrt(n * t * (1 - t))


def _approximate_one_pass(sample: Sample, k, n, tolerance, guess):
  """The steady-state approximate selection, without a loop: one count at
  the guess's pair, the bracket it gives, and whether it is final for every
  channel -- usable guess and spread, and the target straddled with at most
  ``tolerance`` values between the pivots (or an empty channel).

  Returns ((lo, hi, c_lo, c_hi), final).
  """
  g, s = _shared_guess(sample, guess)
  ok = (g > -jnp.inf) & (s > -jnp.inf)
  pivots = _guess_pivots(k, n, jnp.where(ok, g, 0.0), jnp.where(ok, s, 0.0))
  counts = _counts(sample, pivots)
  c_lo, c_hi = counts[..., 0], counts[..., 1]
  lo, hi = pivots[..., 0], pivots[..., 1]
  hit = (c_lo < k) & (k <= c_hi) & (c_hi - c_lo <= tolerance)
  # A bracket of one value with an end at ±inf: the value is to be read
  # off the data (the general path does).
  unread = ((lo + 1 == hi) | (c_hi - c_lo <= 1)) & _unbounded(lo, hi)
  final = jnp.all((ok & hit & ~unread) | (n == 0))
  return (lo, hi, c_lo, c_hi), final


def _select_approximate(sample: Sample, k: Array, guess=None):
  """(q̂, bracket (lo, hi], its count m, 1/m, passes): the search stopped at
  the approximate tolerance, q̂ interpolated in the final bracket; no
  gradient.

  q̂ lies in (lo, hi] and c(lo) < k <= c(hi), so #{x <= q̂} is within m of
  k. Where the bracket is finished exactly (one key, or m <= 1) q̂ = hi:
  then c(q̂) = c(hi) = k (one value) or q̂ = x_(k) (one key), and an end at
  ±inf or NaN (a first pass that missed, then finished) is read off the data
  (one reduction, only then).

  From a guess, the first pass is :func:`_approximate_one_pass`; only where
  it is not final for some channel does the general search run (one
  ``lax.cond``: the steady state costs one count and a few per-channel
  operations, not the loop's conditionals). q̂ is computed inside the
  branches (see :func:`_select`).
  """
  shape = sample.channel_shape
  n = sample.count().astype(jnp.float32)
  k = jnp.broadcast_to(jnp.asarray(k, jnp.int32), shape).astype(jnp.float32)
  tolerance = _approximate_tolerance(k, n)
  empty = n == 0

  def finish(lo, hi, c_lo, c_hi):
    # An empty channel: bracket (-1, 0] -> value 0.
    lo, hi = jnp.where(empty, -1, lo), jnp.where(empty, 0, hi)
    c_lo, c_hi = jnp.where(empty, 0.0, c_lo), jnp.where(empty, 0.0, c_hi)
    m = c_hi - c_lo
    exact = (lo + 1 == hi) | (m <= 1)
    # Rank interpolation across the bracket, as for the pivots: the m
    # values spread evenly, rank j at fraction (j - 1/2) / m.
    finite = _INF_KEY - 1
    a = key_to_float(jnp.clip(lo, -finite, finite))
    b = key_to_float(jnp.clip(hi, -finite, finite))
    f = jnp.clip((k - c_lo - 0.5) / jnp.maximum(m, 1.0), 0.0, 1.0)
    between = a * (1.0 - f) + b * f
    # Keep it in (lo, hi] (rounding), as a key.
    inside = jnp.clip(float_to_key(between), lo + 1, hi)
    q = key_to_float(jnp.where(exact, hi, inside)).astype(sample.x.dtype)
    return q, lo, hi, m, (1.0 / jnp.maximum(m, 1.0)).astype(sample.x.dtype)

  def search():
    lo, hi, c_lo, c_hi, _, _, passes = _search(sample, k, guess, tolerance)
    # A bracket of one value with an end at ±inf or NaN: read it off.
    unread = ((lo + 1 == hi) | (c_hi - c_lo <= 1)) & _unbounded(lo, hi)
    # (q computed inside the branches: see _select.)
    finished = lax.cond(
      jnp.any(unread),
      lambda: finish(
        lo,
        jnp.where(unread, _extreme_in(sample, lo, hi, True), hi),
        c_lo,
        c_hi,
      ),
      lambda: finish(lo, hi, c_lo, c_hi),
    )
    return finished, passes

  if guess is None:
    finished, passes = search()
    return (*finished, passes)
  bracket, final = _approximate_one_pass(sample, k, n, tolerance, guess)

  def general():
    finished, passes = search()
    return finished, passes + 1  # the one pass, then the search

  # Steady state: the one pass; else the general search.
  finished, passes = lax.cond(
    final, lambda: (finish(*bracket), jnp.int32(1)), general
  )
  return (*finished, passes)


# --------------------------------------------------------------------------
# Gradient: g * [x == q] / ties, attached through a free custom_jvp.
# --------------------------------------------------------------------------


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _tie_zeros(axes, x, q_key, inv_ties, valid):
  """Zeros of x's shape with derivative x_dot * [x == q] / ties (masked),
  ``q_key`` the key of q.

  A ``custom_jvp`` (forward and reverse mode): the tangent map is
  elementwise, so its transpose -- the backward pass -- is elementwise too,
  and it needs only x and per-channel values.
  """
  del q_key, inv_ties, valid
  return jnp.zeros_like(x)


@_tie_zeros.defjvp
def _tie_zeros_jvp(axes, primals, tangents):
  x, q_key, inv_ties, valid = primals
  x_dot = tangents[0]
  # Key equality, not float ==: CPUs may treat denormals as zero in compares.
  hit = float_to_key(x) == jnp.expand_dims(q_key, axes)
  if valid is not None:
    hit = hit & valid
  w = jnp.where(hit, jnp.expand_dims(inv_ties, axes), jnp.zeros_like(x))
  return jnp.zeros_like(x), x_dot * w


def _attach_gradient(sample: Sample, value, key, inv_ties) -> Array:
  """value + Σ_i zeros_i: equal to ``value``; gradient of x_(k) w.r.t. x.

  ``key`` and ``inv_ties`` (= 1 / #ties) come computed from the selection
  (a conditional's outputs: see :func:`_select`). The sum is a reduction of
  the sample like any other (it ``psum``s across devices), so the devices'
  cotangents meet the way they meet for the mean.
  """
  zeros = _tie_zeros(
    sample.axes, sample.x, key, lax.stop_gradient(inv_ties), sample.mask
  )
  return lax.stop_gradient(value) + sample.sum(zeros)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _bracket_zeros(axes, x, lo, hi, inv_m, valid):
  """Zeros with derivative x_dot * [lo < key(x) <= hi] / m (masked): the
  gradient of the mean of the values in the bracket (elementwise)."""
  del lo, hi, inv_m, valid
  return jnp.zeros_like(x)


@_bracket_zeros.defjvp
def _bracket_zeros_jvp(axes, primals, tangents):
  x, lo, hi, inv_m, valid = primals
  key = float_to_key(x)
  lo, hi = jnp.expand_dims(lo, axes), jnp.expand_dims(hi, axes)
  inside = (key > lo) & (key <= hi)
  if valid is not None:
    inside = inside & valid
  w = jnp.where(inside, jnp.expand_dims(inv_m, axes), jnp.zeros_like(x))
  return jnp.zeros_like(x), tangents[0] * w


# --------------------------------------------------------------------------
# Public API.
# --------------------------------------------------------------------------


def _use_engine(sample: Sample) -> bool:
  # Keys are float32 bits; half precision is exact in float32; float64
  # (x64 mode) falls back to the sort.
  return jnp.dtype(sample.x.dtype).itemsize <= 4


def kth_smallest(
  sample: Sample, k: Array, *, guess: Array | None = None
) -> Array:
  """x_(k): the k-th smallest valid value of each channel (1-based ``k``).

  ``k`` (int32, channel shape) lies in [1, n]; an empty channel gives 0.
  Exact (equal to the sort's value); gradient ``g [x == x_(k)] / #ties``.
  ``guess`` (channel shape): where the search starts (see
  :class:`~gbn_jax.sample.Sample`'s ``quantile_guess``); it changes the
  number of passes, never the value.
  """
  if not _use_engine(sample):
    return kth_smallest_by_sort(sample, k)
  value, key, inv_ties, _, _ = _select(sample, k, guess)
  return _attach_gradient(sample, value, key, inv_ties)


def selection_passes(
  sample: Sample, k: Array, *, guess: Array | None = None
) -> Array:
  """How many counting passes the exact engine takes for this sample and
  rank (from ``guess`` if given, else cold)."""
  return _select(sample, k, guess)[4]


def quantile_passes(sample: Sample, alpha: float) -> Array:
  """How many counting passes :func:`quantile` takes for ``sample`` as it
  is configured (its guess of q_α, approximate or exact)."""
  if sample.approximate:
    return _approximate_selection(sample, alpha)[5]
  k = quantile_rank(alpha, sample.count())
  return _select(sample, k, sample.guess_for(alpha))[4]


def _approximate_selection(sample: Sample, alpha: float):
  """:func:`_select_approximate` for level α (memoised: one per level)."""
  return sample.memo(
    ("approx_selection", float(alpha)),
    lambda: _select_approximate(
      sample, quantile_rank(alpha, sample.count()), sample.guess_for(alpha)
    ),
  )


def approximate_quantile(sample: Sample, alpha: float) -> Array:
  """q̂_α: the exact engine stopped at a bracket of at most
  ``APPROX_BRACKET_SE`` standard errors, q_α interpolated inside it.

  Warm-started from ``sample``'s guess of q_α when it has one. The bracket
  (lo, hi] always holds x_(k), so ``|#{x <= q̂} - k| <= m``, m the values in
  it (the module docstring states the bound). Counts are pooled over the
  devices, so q̂ is identical on every device. Gradient: that of the mean of
  the m values in the bracket, ``g [lo < x <= hi] / m`` (x_(k)'s own
  gradient where the bracket holds one value or one key).
  """
  if not _use_engine(sample):
    return kth_smallest_by_sort(sample, quantile_rank(alpha, sample.count()))
  q, lo, hi, _, inv_m, _ = _approximate_selection(sample, alpha)
  zeros = _bracket_zeros(
    sample.axes, sample.x, lo, hi, lax.stop_gradient(inv_m), sample.mask
  )
  return lax.stop_gradient(q) + sample.sum(zeros)


def approximate_bracket(sample: Sample, alpha: float):
  """(q̂_α, m): the approximate quantile and the number of values m in its
  final bracket -- ``|#{x <= q̂} - ceil(α n)| <= m`` (diagnostics, tests)."""
  q, _, _, m, _, _ = _approximate_selection(sample, alpha)
  return q, m


def quantile(sample: Sample, alpha: float) -> Array:
  """q_alpha = x_(k), k = ceil(alpha n) clipped to [1, n] (memoised per alpha).

  Starts from ``sample``'s guess of q_α where it has one (same result, fewer
  passes). With ``sample.approximate`` the estimate of
  :func:`approximate_quantile` instead.
  """
  if getattr(sample, "approximate", False):
    return sample.memo(
      ("approx_quantile", float(alpha)),
      lambda: approximate_quantile(sample, alpha),
    )

  def compute():
    k = quantile_rank(alpha, sample.count())
    guess = sample.guess_for(alpha)
    if guess is None:  # the two-argument call (tests swap kth_smallest)
      return kth_smallest(sample, k)
    return kth_smallest(sample, k, guess=guess)

  return sample.memo(("quantile", float(alpha)), compute)


# --------------------------------------------------------------------------
# Sort-based reference (tests, float64 fallback).
# --------------------------------------------------------------------------


def sorted_values(sample: Sample) -> Array:
  """Each channel's valid values in ascending order, padded with +inf.

  Shape ``(*channel_shape, m)`` with ``m`` the pooled number of slots; the
  first ``n`` entries of a channel are its valid values (all devices; this
  gathers them -- the reference, not the engine).
  """

  def compute():
    x = sample.x
    if sample.mask is not None:
      x = jnp.where(sample.mask, x, jnp.inf)
    x = _channels_last(sample, x)
    if sample.axis_name is not None:
      x = lax.all_gather(
        x,
        sample.axis_name,
        axis_index_groups=sample.axis_index_groups,
        axis=x.ndim - 1,
        tiled=True,
      )
    return jnp.sort(x, axis=-1)

  return sample.memo("sorted", compute)


def kth_smallest_by_sort(sample: Sample, k: Array, *, guess=None) -> Array:
  """Reference x_(k) by sorting (JAX's gradient: 1 at the selected element);
  ``guess`` is ignored."""
  del guess
  s = sorted_values(sample)
  idx = jnp.broadcast_to(jnp.asarray(k, jnp.int32) - 1, sample.channel_shape)
  v = jnp.take_along_axis(s, idx[..., None], axis=-1)[..., 0]
  if sample.mask is not None:
    v = jnp.where(sample.count() > 0, v, jnp.zeros_like(v))
  return v
