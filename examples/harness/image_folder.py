"""Image-folder datasets: ``train/<class>/*`` and ``test/<class>/*``.

A source is either a directory in that layout or a tar archive of one
(``.tar``, ``.tar.gz``, ``.tar.xz``, ...; the two split folders may sit under
one common prefix inside the archive). Classes are the folder names, sorted
(for CIFAR-10 that is its official label order); every class of ``train/``
must also be in ``test/`` and the other way round. Files whose name starts
with a dot are ignored; every other file must decode as an image of the
expected size.

Images are decoded once (Pillow, with a progress bar) and the uint8 arrays
are cached as ``<cache_dir>/<source name>-<key>-<H>x<W>-v<N>.npz``, keyed by
the source's sha256:

* archive: sha256 of the archive file's bytes;
* directory: sha256 over the lines ``<relative path>\\0<size>\\0<mtime_ns>`` of
  every file under ``train/`` and ``test/``, sorted by relative path (so
  touching, adding, removing or resizing a file invalidates the cache; the
  bytes are not read).
"""

from __future__ import annotations

import hashlib
import io
import os
import sys
import tarfile
from pathlib import PurePosixPath

import numpy as np
from tqdm.auto import tqdm

SPLITS = ("train", "test")
CACHE_VERSION = 1  # bump when the cached arrays' layout changes


def default_cache_dir() -> str:
  """``$XDG_CACHE_HOME/gbn_jax`` (``~/.cache/gbn_jax`` when unset)."""
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
  return os.path.join(os.path.expanduser(base), "gbn_jax")


def decode_image(data: bytes, where: str, image_size: tuple[int, int]):
  """One image file's bytes as an (H, W, 3) uint8 array.

  Args:
    data: the file's bytes.
    where: the file's path, for error messages.
    image_size: expected (height, width).

  Raises:
    ValueError: naming ``where`` when the bytes are not an image or the image
      has another size.
  """
  # Pillow only where images are decoded (an optional dependency).
  from PIL import Image, UnidentifiedImageError  # noqa: PLC0415

  try:
    with Image.open(io.BytesIO(data)) as img:
      img = img.convert("RGB")
  except (UnidentifiedImageError, OSError) as err:
    raise ValueError(f"cannot decode image {where!r}: {err}") from None
  height, width = image_size
  if img.size != (width, height):
    raise ValueError(
        f"image {where!r} is {img.size[1]}x{img.size[0]} (HxW), expected"
        f" {height}x{width}")
  return np.asarray(img, np.uint8)


# -- listing and hashing ------------------------------------------------------


def _is_hidden(name: str) -> bool:
  return name.startswith(".")


def _directory_files(root: str) -> list[tuple[str, str, str]]:
  """(split, class, relative path) of every image file under root's splits.

  Raises:
    ValueError: naming the missing ``train/`` or ``test/`` folder.
  """
  files = []
  for split in SPLITS:
    split_dir = os.path.join(root, split)
    if not os.path.isdir(split_dir):
      raise ValueError(
          f"{root!r} has no {split}/ folder; expected the image-folder layout"
          " train/<class>/* and test/<class>/*")
    for dirpath, dirnames, filenames in os.walk(split_dir):
      dirnames[:] = sorted(d for d in dirnames if not _is_hidden(d))
      rel_dir = os.path.relpath(dirpath, root)
      parts = PurePosixPath(rel_dir.replace(os.sep, "/")).parts
      for name in sorted(f for f in filenames if not _is_hidden(f)):
        rel = f"{rel_dir}/{name}".replace(os.sep, "/")
        if len(parts) != 2:  # a file in split/ itself or in a nested folder
          raise ValueError(
              f"unexpected file {os.path.join(root, rel)!r}: images go in"
              f" {split}/<class>/<file>")
        files.append((split, parts[1], rel))
  return files


def directory_key(root: str, files) -> str:
  """sha256 over sorted (relative path, size, mtime_ns) of the files."""
  digest = hashlib.sha256()
  for _, _, rel in sorted(files, key=lambda f: f[2]):
    st = os.stat(os.path.join(root, rel))
    digest.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
  return digest.hexdigest()


def file_sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def _archive_members(path: str) -> list[tuple[str, str, str, bytes]]:
  """(split, class, member name, bytes) of every image file in the archive.

  Raises:
    ValueError: naming the archive when it is not a readable tar archive, or
      a member that is not at ``[prefix/]<split>/<class>/<file>``.
  """
  members, prefixes = [], set()
  try:
    with tarfile.open(path, "r:*") as tar:
      for info in tar:
        parts = PurePosixPath(info.name).parts
        if not info.isfile() or any(_is_hidden(p) for p in parts):
          continue
        splits_at = [i for i, p in enumerate(parts) if p in SPLITS]
        if not splits_at:
          continue  # e.g. a README beside the split folders
        if len(parts) - splits_at[-1] != 3:
          raise ValueError(
              f"unexpected file {path}:{info.name}: images go in"
              " [prefix/]<split>/<class>/<file>")
        prefixes.add(parts[:-3])
        members.append((parts[-3], parts[-2], info.name,
                        tar.extractfile(info).read()))
  except (tarfile.TarError, EOFError, OSError) as err:
    raise ValueError(f"cannot read archive {path!r}: {err}") from None
  if len(prefixes) > 1:
    raise ValueError(f"archive {path!r} holds more than one train/test root:"
                     f" {sorted('/'.join(p) or '.' for p in prefixes)}")
  return members


def _check_classes(where: str, entries) -> list[str]:
  """The sorted class names; every class in both splits.

  Args:
    where: the source's path, prefixed to the folders named in errors.
    entries: (split, class, ...) tuples.
  """
  by_split = {s: sorted({e[1] for e in entries if e[0] == s}) for s in SPLITS}
  for split in SPLITS:
    if not by_split[split]:
      raise ValueError(f"no images in {where}/{split}/ (expected"
                       f" {split}/<class>/<image files>)")
  for split, other in (("train", "test"), ("test", "train")):
    missing = sorted(set(by_split[split]) - set(by_split[other]))
    if missing:
      raise ValueError(
          f"class folder {where}/{other}/{missing[0]} is missing (it exists in"
          f" {split}/; every class needs both splits); missing: {missing}")
  return by_split["train"]


# -- decoding and caching -----------------------------------------------------


def _decode_all(items: list[tuple[str, str, str, object]], classes, read,
                image_size, progress: bool, desc: str):
  """Arrays per split from (split, class, where, handle); ``read(handle)``
  gives the bytes. Images are ordered by (class, file name) in each split."""
  label = {c: i for i, c in enumerate(classes)}
  items = sorted(items, key=lambda e: (e[0], label[e[1]], e[2]))
  out = {s: ([], []) for s in SPLITS}
  with tqdm(total=len(items), desc=desc, unit="img", disable=not progress,
            file=sys.stderr, leave=False) as bar:
    for split, cls, where, handle in items:
      out[split][0].append(decode_image(read(handle), where, image_size))
      out[split][1].append(label[cls])
      bar.update()
  height, width = image_size
  arrays = {}
  for split, (images, labels) in out.items():
    arrays[f"x_{split}"] = np.stack(images).reshape(-1, height, width, 3)
    arrays[f"y_{split}"] = np.asarray(labels, np.int32)
  return arrays


def _read_file(path: str) -> bytes:
  with open(path, "rb") as f:
    return f.read()


def _source_name(path: str) -> str:
  name = os.path.basename(os.path.normpath(path))
  for ext in (".tar.xz", ".tar.gz", ".tar.bz2", ".tgz", ".tar"):
    if name.endswith(ext):
      return name[: -len(ext)]
  return name


def load_image_folder(source: str, cache_dir: str | None = None,
                      image_size: tuple[int, int] = (32, 32),
                      progress: bool = True) -> dict[str, np.ndarray]:
  """Decoded arrays of an image-folder dataset, from the cache when present.

  Args:
    source: a tar archive or a directory with ``train/<class>/*`` and
      ``test/<class>/*``.
    cache_dir: where the ``.npz`` cache lives (default
      :func:`default_cache_dir`); created when missing.
    image_size: expected (height, width) of every image.
    progress: show a progress bar while decoding.

  Returns:
    ``x_train``, ``x_test``: (N, H, W, 3) uint8; ``y_train``, ``y_test``:
    (N,) int32 labels; ``classes``: the class names in label order.

  Raises:
    FileNotFoundError: no file or directory at ``source``.
    ValueError: naming the offending path when the source is malformed (no
      ``train/`` or ``test/``, a class in one split only, a file that is not
      an image or has another size, an unreadable archive).
  """
  if not os.path.exists(source):
    raise FileNotFoundError(f"no image-folder dataset at {source!r}")
  if os.path.isdir(source):
    files = _directory_files(source)
    key = directory_key(source, files)
  else:
    files = None
    key = file_sha256(source)
  cache_dir = cache_dir or default_cache_dir()
  height, width = image_size
  cache_path = os.path.join(
      cache_dir, f"{_source_name(source)}-{key[:16]}-{height}x{width}"
      f"-v{CACHE_VERSION}.npz")
  if os.path.exists(cache_path):
    with np.load(cache_path) as cached:
      if str(cached["source_sha256"]) == key:
        return {k: cached[k] for k in cached.files if k != "source_sha256"}

  desc = f"decoding {os.path.basename(os.path.normpath(source))}"
  if files is not None:
    classes = _check_classes(os.path.normpath(source), files)
    full = [(s, c, os.path.join(source, rel)) for s, c, rel in files]
    items = [(s, c, path, path) for s, c, path in full]  # read by path
    read = _read_file
  else:
    members = _archive_members(source)
    classes = _check_classes(source, members)
    items = [(s, c, f"{source}:{name}", data) for s, c, name, data in members]
    read = bytes  # the member's bytes are already in memory
  arrays = _decode_all(items, classes, read, image_size, progress, desc)
  arrays["classes"] = np.asarray(classes)

  os.makedirs(cache_dir, exist_ok=True)
  tmp = f"{cache_path}.{os.getpid()}.tmp.npz"
  np.savez(tmp, source_sha256=np.asarray(key), **arrays)
  os.replace(tmp, cache_path)  # atomic: a reader never sees half a file
  return arrays

