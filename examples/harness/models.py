"""Models of the experiments, every normalization layer chosen by name.

Norm names (``--norm``): ``bn`` (``flax.linen.BatchNorm``), ``gbn-<deviation>``
for a deviation in ``gbn_jax.DEVIATIONS`` (with its natural statistic; the
superquantile's level is ``alpha``), ``gbn-<deviation>-approx`` (the same with
``approximate=True``: quantiles from a strided subsample), ``l1bn`` (mean and
mean-abs deviation with the Gaussian-consistent factor sqrt(pi/2), Hoffer et
al.), ``none`` (no normalization, ReLU) and ``selu`` (no normalization, SELU
activations, LeCun-normal init; Klambauer et al.).

Every model is called as ``model.apply(variables, x, train=...)``; in
training mode the norms use the batch's statistics and update their running
averages in the ``batch_stats`` collection.

For other scripts (e.g. benchmarks), with ``examples/`` on ``sys.path``::

  from harness.models import make_norm, plain_cnn, resnet20

  model = resnet20("gbn-superquantile", alpha=0.5)       # flax.linen.Module
  layer = make_norm("bn", train=True)                    # or None
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import flax.linen as nn
import jax.numpy as jnp

import gbn_jax

NORM_BASELINES = ("bn", "none", "selu", "l1bn")
APPROX_SUFFIX = "-approx"
MODELS = ("cnn", "mlp", "resnet20")


@dataclasses.dataclass(frozen=True)
class NormSpec:
  """One normalization setting: ``--norm`` name plus α where it has one."""

  norm: str
  alpha: float | None = None

  @property
  def label(self) -> str:
    return self.norm if self.alpha is None else f"{self.norm}(a={self.alpha:g})"


def _gbn_deviation(norm: str) -> tuple[str, bool] | None:
  """(deviation, approximate) of a ``gbn-...`` name, else None."""
  if not norm.startswith("gbn-"):
    return None
  deviation = norm[len("gbn-"):]
  approximate = deviation.endswith(APPROX_SUFFIX)
  if approximate:
    deviation = deviation[: -len(APPROX_SUFFIX)]
  return deviation, approximate


def check_norm(norm: str) -> None:
  """Raises ValueError, listing the valid names, when ``norm`` is not one."""
  if norm in NORM_BASELINES:
    return
  gbn = _gbn_deviation(norm)
  if gbn is not None and gbn[0] in gbn_jax.DEVIATIONS:
    if gbn[0] == "mixed_superquantile":
      raise ValueError("gbn-mixed_superquantile needs levels; not offered here")
    return
  valid = list(NORM_BASELINES) + [
      f"gbn-{d}" for d in sorted(gbn_jax.DEVIATIONS)
      if d != "mixed_superquantile"
  ] + [f"gbn-<deviation>{APPROX_SUFFIX}"]
  raise ValueError(f"unknown --norm {norm!r}; valid choices: {valid}")


def has_alpha(norm: str) -> bool:
  """Whether the norm takes a level α (the superquantile, exact or approx)."""
  gbn = _gbn_deviation(norm)
  return gbn is not None and gbn[0] == "superquantile"


def expand_norms(norms: Sequence[str],
                 alphas: Sequence[float]) -> list[NormSpec]:
  """One NormSpec per norm, and per α for the superquantile."""
  out = []
  for norm in norms:
    check_norm(norm)
    if has_alpha(norm):
      out.extend(NormSpec(norm, float(a)) for a in alphas)
    else:
      out.append(NormSpec(norm))
  return out


def make_norm_layer(spec: NormSpec, train: bool, momentum: float = 0.9):
  """The normalization module (or None) for ``spec``; feature axis last."""
  use_running_average = not train
  if spec.norm == "bn":
    return nn.BatchNorm(use_running_average=use_running_average,
                        momentum=momentum)
  if spec.norm == "l1bn":
    return gbn_jax.GeneralizedBatchNorm(
        use_running_average=use_running_average, momentum=momentum,
        statistic="mean", deviation="mean_abs", gaussian_consistent=True,
    )
  gbn = _gbn_deviation(spec.norm)
  if gbn is not None:
    deviation, approximate = gbn
    kw = {} if spec.alpha is None else {"alpha": spec.alpha}
    return gbn_jax.GeneralizedBatchNorm(
        use_running_average=use_running_average, momentum=momentum,
        deviation=deviation, approximate=approximate, **kw
    )
  return None  # none, selu


def make_norm(norm: str, alpha: float | None = None, *, train: bool,
              momentum: float = 0.9):
  """The normalization layer called ``norm`` (None for ``none``/``selu``).

  Args:
    norm: a ``--norm`` name, e.g. ``"bn"``, ``"gbn-superquantile"``,
      ``"gbn-superquantile-approx"``, ``"l1bn"``.
    alpha: the superquantile's level (default: the library's, 0.5); ignored
      by norms without one.
    train: normalize with the batch's statistics (else the running averages).
    momentum: decay of the running averages.
  """
  check_norm(norm)
  return make_norm_layer(NormSpec(norm, alpha if has_alpha(norm) else None),
                         train, momentum)


def activation(spec: NormSpec):
  return nn.selu if spec.norm == "selu" else nn.relu


def conv_init(spec: NormSpec):
  """He normal for ReLU networks (He et al. 2015), LeCun normal for SELU."""
  if spec.norm == "selu":
    return nn.initializers.lecun_normal()
  return nn.initializers.he_normal()


class Block(nn.Module):
  """layer -> norm -> activation. The layer has no bias when a norm follows
  (the norm's shift replaces it). The default kernel init is Flax's LeCun
  normal, which SELU needs."""

  layer: str  # "dense" or "conv"
  features: int
  spec: NormSpec
  spatial_ndim: int = 1
  stride: int = 1
  kernel_init: Callable = nn.initializers.lecun_normal()

  @nn.compact
  def __call__(self, x, train: bool):
    norm = make_norm_layer(self.spec, train)
    use_bias = norm is None
    if self.layer == "dense":
      x = nn.Dense(self.features, use_bias=use_bias,
                   kernel_init=self.kernel_init)(x)
    else:
      x = nn.Conv(
          self.features, (3,) * self.spatial_ndim,
          strides=(self.stride,) * self.spatial_ndim, use_bias=use_bias,
          kernel_init=self.kernel_init,
      )(x)
    if norm is not None:
      x = norm(x)
    return activation(self.spec)(x)


class CNN(nn.Module):
  """3 conv blocks (strides 1, 2, 2), flatten, dense classifier. 1-D or 2-D
  convolutions after the input's rank (mnist1d, digits)."""

  spec: NormSpec
  num_classes: int = 10
  width: int = 32

  @nn.compact
  def __call__(self, x, train: bool = False):
    nd = x.ndim - 2
    for stride in (1, 2, 2):
      x = Block("conv", self.width, self.spec, nd, stride)(x, train)
    return nn.Dense(self.num_classes)(x.reshape(x.shape[0], -1))


class PlainCNN(nn.Module):
  """A small plain VGG-like CNN for 32x32 images: 3 stages of
  [conv -> norm -> act] x 2 then 2x2 max-pooling, with ``width``, 2 ``width``,
  4 ``width`` channels (16/32/64 by default, as ResNet-20); then flatten
  (4x4 x 4 ``width``) and a dense classifier. No shortcuts."""

  spec: NormSpec
  num_classes: int = 10
  width: int = 16

  @nn.compact
  def __call__(self, x, train: bool = False):
    init = conv_init(self.spec)
    for stage in range(3):
      for _ in range(2):
        x = Block("conv", self.width * 2**stage, self.spec, 2,
                  kernel_init=init)(x, train)
      x = nn.max_pool(x, (2, 2), strides=(2, 2))
    return nn.Dense(self.num_classes)(x.reshape(x.shape[0], -1))


class ConvNorm(nn.Module):
  """3x3 conv -> norm (no activation); the conv has a bias only without norm."""

  features: int
  spec: NormSpec
  stride: int = 1

  @nn.compact
  def __call__(self, x, train: bool):
    norm = make_norm_layer(self.spec, train)
    x = nn.Conv(self.features, (3, 3), strides=(self.stride, self.stride),
                use_bias=norm is None, kernel_init=conv_init(self.spec))(x)
    return x if norm is None else norm(x)


class BasicBlock(nn.Module):
  """ResNet basic block: act(norm(conv(act(norm(conv(x))))) + shortcut(x)).

  Option-A shortcut (He et al. 2016, CIFAR): the identity; where the block
  halves the resolution and doubles the channels, the input subsampled by 2
  with zero channels appended -- parameter-free, so every convolution of the
  network is followed by a norm.
  """

  features: int
  spec: NormSpec
  stride: int = 1

  @nn.compact
  def __call__(self, x, train: bool):
    act = activation(self.spec)
    y = act(ConvNorm(self.features, self.spec, self.stride)(x, train))
    y = ConvNorm(self.features, self.spec)(y, train)
    shortcut = x[:, ::self.stride, ::self.stride, :]
    extra = self.features - x.shape[-1]
    if extra:
      shortcut = jnp.pad(shortcut, ((0, 0), (0, 0), (0, 0), (0, extra)))
    return act(y + shortcut)


class ResNet20(nn.Module):
  """ResNet-20 for CIFAR (He et al. 2016, section 4.2): conv(16) -> norm ->
  act, 3 stages of 3 basic blocks with 16, 32, 64 channels (the first block
  of stages 2 and 3 has stride 2), global average pooling, dense classifier.
  19 convolutions, each followed by a norm; option-A shortcuts."""

  spec: NormSpec
  num_classes: int = 10
  width: int = 16

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = activation(self.spec)(ConvNorm(self.width, self.spec)(x, train))
    for stage in range(3):
      for block in range(3):
        stride = 2 if stage > 0 and block == 0 else 1
        x = BasicBlock(self.width * 2**stage, self.spec, stride)(x, train)
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes)(x)


class MLP(nn.Module):
  """2 hidden dense blocks, dense classifier."""

  spec: NormSpec
  num_classes: int = 10
  width: int = 128

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = x.reshape(x.shape[0], -1)
    for _ in range(2):
      x = Block("dense", self.width, self.spec)(x, train)
    return nn.Dense(self.num_classes)(x)


def _spec(norm: str, alpha: float | None) -> NormSpec:
  check_norm(norm)
  return NormSpec(norm, alpha if has_alpha(norm) else None)


def resnet20(norm: str, alpha: float | None = None, num_classes: int = 10,
             width: int = 16) -> nn.Module:
  """ResNet-20 (CIFAR) with every norm layer ``make_norm(norm, alpha)``.

  Args:
    norm: a ``--norm`` name (see the module docstring).
    alpha: the superquantile's level (library default 0.5 when None).
    num_classes: outputs of the classifier.
    width: channels of the first stage (16 in He et al.).
  """
  return ResNet20(_spec(norm, alpha), num_classes, width)


def plain_cnn(norm: str, alpha: float | None = None, num_classes: int = 10,
              width: int = 16) -> nn.Module:
  """The plain VGG-like CNN for 32x32 images (see :class:`PlainCNN`)."""
  return PlainCNN(_spec(norm, alpha), num_classes, width)


def is_image32(input_shape: Sequence[int] | None) -> bool:
  """Whether an example of this shape is a 32x32 (or larger) RGB image."""
  return (input_shape is not None and len(input_shape) == 3
          and min(input_shape[:2]) >= 32)


def build_model(model: str, spec: NormSpec, num_classes: int = 10,
                width: int | None = None,
                input_shape: Sequence[int] | None = None) -> nn.Module:
  """The ``--model`` network for inputs of ``input_shape`` (one example).

  ``cnn`` is :class:`PlainCNN` for 32x32 images and :class:`CNN` otherwise.
  """
  if model == "cnn":
    if is_image32(input_shape):
      return PlainCNN(spec, num_classes, width or 16)
    return CNN(spec, num_classes, width or 32)
  if model == "mlp":
    return MLP(spec, num_classes, width or 128)
  if model == "resnet20":
    return ResNet20(spec, num_classes, width or 16)
  raise ValueError(
      f"unknown model {model!r}; valid choices: 'cnn', 'mlp', 'resnet20'")
