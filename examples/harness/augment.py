"""Standard CIFAR augmentation in JAX: random crop after padding, and flip.

Runs inside the compiled training step; the randomness comes from a key that
the training loop derives from the run's seed and the step number, so every
normalization sees the same augmented batches for a given seed.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def random_crop_flip(key, images, padding: int = 4):
  """Pads by ``padding`` pixels, crops back at a random offset, flips half.

  The padding is zeros, which on standardised images is the training set's
  mean colour (torchvision pads raw images with black instead).

  Args:
    key: a PRNG key.
    images: (N, H, W, C) images.
    padding: pixels added on each side before the crop.

  Returns:
    (N, H, W, C): each image shifted by up to ``padding`` pixels in each
    direction and, with probability 1/2, mirrored left to right.
  """
  n, height, width, channels = images.shape
  crop_key, flip_key = jax.random.split(key)
  padded = jnp.pad(images, ((0, 0), (padding, padding), (padding, padding),
                            (0, 0)))
  offsets = jax.random.randint(crop_key, (n, 2), 0, 2 * padding + 1)

  def crop(image, offset):
    return jax.lax.dynamic_slice(image, (offset[0], offset[1], 0),
                                 (height, width, channels))

  cropped = jax.vmap(crop)(padded, offsets)
  flip = jax.random.bernoulli(flip_key, 0.5, (n,))
  return jnp.where(flip[:, None, None, None], cropped[:, :, ::-1], cropped)
