"""Datasets of the experiments: (x_train, y_train, x_test, y_test).

x is channels-last float32, y int32. Nothing downloads:

* ``mnist1d``: generated offline by the ``mnist1d`` package;
* ``digits``: scikit-learn's bundled 8x8 digits;
* ``cifar10``: read from ``--data-dir``, which may be the official python
  batches (``cifar-10-batches-py``), an image folder (``train/<class>/*``,
  ``test/<class>/*``) or a tar archive of one (decoded once, then cached; see
  :mod:`harness.image_folder`).
"""

from __future__ import annotations

import os
import pickle

import numpy as np

from harness import image_folder

DATASETS = ("mnist1d", "digits", "cifar10")


def load_mnist1d():
  """MNIST-1D generated offline with the package's default arguments.

  ``make_dataset`` builds the data from templates (no network); 4000 train and
  1000 test sequences of length 40, already standardised. Shape (N, 40, 1).
  """
  from mnist1d.data import get_dataset_args, make_dataset  # noqa: PLC0415

  d = make_dataset(get_dataset_args())
  return (
      d["x"][..., None].astype(np.float32), d["y"].astype(np.int32),
      d["x_test"][..., None].astype(np.float32), d["y_test"].astype(np.int32),
  )


def load_digits_data(test_fraction: float = 0.25, seed: int = 0):
  """scikit-learn's bundled 8x8 digits, a fixed stratified 75/25 split.

  Pixels are standardised with the training set's mean and std (one scalar
  each). Shape (N, 8, 8, 1).
  """
  from sklearn.datasets import load_digits  # noqa: PLC0415
  from sklearn.model_selection import train_test_split  # noqa: PLC0415

  d = load_digits()
  x = d.images.astype(np.float32)[..., None]
  y = d.target.astype(np.int32)
  x_tr, x_te, y_tr, y_te = train_test_split(
      x, y, test_size=test_fraction, random_state=seed, stratify=y
  )
  mu, sd = x_tr.mean(), x_tr.std()
  return (x_tr - mu) / sd, y_tr, (x_te - mu) / sd, y_te


def standardise_per_channel(x_train_u8, x_test_u8):
  """uint8 images (channels last) to float32 pixel / 255, standardised per
  channel with the training set's mean and std.

  The statistics come from each channel's histogram of the 256 pixel values:
  exact (float64), and fast on 50,000 images.
  """
  channels = x_train_u8.shape[-1]
  flat = x_train_u8.reshape(-1, channels)
  values = np.arange(256) / 255
  mu, sd = np.empty(channels), np.empty(channels)
  for c in range(channels):
    hist = np.bincount(flat[:, c], minlength=256) / len(flat)
    mu[c] = hist @ values
    sd[c] = np.sqrt(hist @ (values - mu[c]) ** 2)
  scale = (1 / (255 * sd)).astype(np.float32)
  shift = (-mu / sd).astype(np.float32)
  return (x_train_u8.astype(np.float32) * scale + shift,
          x_test_u8.astype(np.float32) * scale + shift)


def _read_cifar_batch(path: str):
  with open(path, "rb") as f:
    d = pickle.load(f, encoding="bytes")
  data = d.get(b"data", d.get("data"))
  labels = d.get(b"labels", d.get("labels"))
  x = np.asarray(data, np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
  return x, np.asarray(labels, np.int32)


def _python_batches_root(data_dir: str) -> str | None:
  """The folder holding CIFAR-10's python batches, or None if there is none."""
  sub = os.path.join(data_dir, "cifar-10-batches-py")
  root = sub if os.path.isdir(sub) else data_dir
  names = ["test_batch"] + [f"data_batch_{i}" for i in range(1, 6)]
  if any(os.path.exists(os.path.join(root, n)) for n in names):
    return root
  return None


def load_cifar10_batches(root: str):
  """Raw uint8 CIFAR-10 from the python batches in ``root``.

  Reads ``data_batch_1`` ... ``data_batch_5`` (those present) and
  ``test_batch``: dicts with ``data`` (N x 3072 uint8, channel-major rows)
  and ``labels``.
  """
  train_files = [
      os.path.join(root, f"data_batch_{i}") for i in range(1, 6)
      if os.path.exists(os.path.join(root, f"data_batch_{i}"))
  ]
  test_file = os.path.join(root, "test_batch")
  if not train_files or not os.path.exists(test_file):
    raise FileNotFoundError(
        f"no CIFAR-10 python batches (data_batch_1..5, test_batch) in {root!r}"
    )
  parts = [_read_cifar_batch(f) for f in train_files]
  x_te, y_te = _read_cifar_batch(test_file)
  return (np.concatenate([p[0] for p in parts]),
          np.concatenate([p[1] for p in parts]), x_te, y_te)


def load_cifar10(data_dir: str | None, cache_dir: str | None = None,
                 progress: bool = True):
  """CIFAR-10, standardised per channel with the training set's statistics.

  Args:
    data_dir: the python batches' directory (or its parent holding
      ``cifar-10-batches-py``), an image-folder directory (``train/<class>/*``
      and ``test/<class>/*``), or a tar archive (e.g. ``.tar.xz``) of one.
    cache_dir: cache of decoded image folders (default
      ``~/.cache/gbn_jax``); the python batches are read directly.
    progress: show a progress bar while decoding images.

  Returns:
    (x_train, y_train, x_test, y_test), x of shape (N, 32, 32, 3) float32.

  Raises:
    ValueError: without ``data_dir``, or naming the path of malformed data.
    FileNotFoundError: naming ``data_dir`` when it holds none of the layouts.
  """
  if data_dir is None:
    raise ValueError("--dataset cifar10 needs --data-dir (nothing downloads)")
  if not os.path.exists(data_dir):
    raise FileNotFoundError(f"--data-dir {data_dir!r} does not exist")
  batches = os.path.isdir(data_dir) and _python_batches_root(data_dir)
  if batches:
    x_tr, y_tr, x_te, y_te = load_cifar10_batches(batches)
  elif os.path.isfile(data_dir) or any(
      os.path.isdir(os.path.join(data_dir, s)) for s in image_folder.SPLITS):
    arrays = image_folder.load_image_folder(data_dir, cache_dir,
                                            progress=progress)
    x_tr, y_tr = arrays["x_train"], arrays["y_train"]
    x_te, y_te = arrays["x_test"], arrays["y_test"]
  else:
    raise FileNotFoundError(
        f"no CIFAR-10 in {data_dir!r}: expected the python batches"
        " (data_batch_1..5, test_batch, or a cifar-10-batches-py folder), an"
        " image folder (train/<class>/*, test/<class>/*) or a tar archive of"
        " one")
  x_tr, x_te = standardise_per_channel(x_tr, x_te)
  return x_tr, y_tr, x_te, y_te


def load_dataset(name: str, data_dir: str | None = None,
                 cache_dir: str | None = None, progress: bool = True):
  """(x_train, y_train, x_test, y_test) of the dataset called ``name``."""
  if name == "mnist1d":
    return load_mnist1d()
  if name == "digits":
    return load_digits_data()
  if name == "cifar10":
    return load_cifar10(data_dir, cache_dir, progress)
  raise ValueError(
      f"unknown dataset {name!r}; valid choices: 'mnist1d', 'digits', 'cifar10'"
  )
