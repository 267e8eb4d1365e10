"""The image-folder loader of examples/harness: archive and directory sources,
the cache, the errors on malformed data, standardisation and augmentation.

Every dataset here is a few tiny JPEGs written into tmp_path."""

import hashlib
import io
import os
import sys
import tarfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

PIL = pytest.importorskip("PIL")
from PIL import Image  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))

from harness import augment, data, image_folder  # noqa: E402

CLASSES = ("bird", "cat", "frog")  # sorted: the label order
COUNTS = {"train": 3, "test": 2}  # images per class


def _jpeg(seed, size=(32, 32)):
  pixels = np.random.default_rng(seed).integers(0, 256, (*size, 3), np.uint8)
  buf = io.BytesIO()
  Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
  return buf.getvalue()


def _decoded(jpeg_bytes):
  return np.asarray(Image.open(io.BytesIO(jpeg_bytes)).convert("RGB"))


def _files():
  """{relative path: jpeg bytes} of the tiny dataset."""
  files, seed = {}, 0
  for split, count in COUNTS.items():
    for cls in CLASSES:
      for i in range(count):
        files[f"{split}/{cls}/{i:04d}.jpg"] = _jpeg(seed)
        seed += 1
  return files


def make_folder(root, files=None):
  files = _files() if files is None else files
  for rel, content in files.items():
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
  return root


def make_archive(path, files=None, prefix=""):
  files = _files() if files is None else files
  with tarfile.open(path, "w:xz") as tar:
    for rel, content in files.items():
      info = tarfile.TarInfo(prefix + rel)
      info.size = len(content)
      tar.addfile(info, io.BytesIO(content))
  return path


def _expected(files):
  """Arrays decoded independently: per split, ordered by (class, name)."""
  out = {}
  for split in COUNTS:
    rels = sorted((CLASSES.index(rel.split("/")[1]), rel) for rel in files
                  if rel.startswith(split + "/"))
    out[f"x_{split}"] = np.stack([_decoded(files[r]) for _, r in rels])
    out[f"y_{split}"] = np.asarray([c for c, _ in rels], np.int32)
  return out


def _fail_decoding(monkeypatch):
  def fail(*args, **kwargs):
    raise AssertionError("decoded although the cache holds the arrays")

  monkeypatch.setattr(image_folder, "decode_image", fail)


# -- the two sources, and the cache -------------------------------------------


@pytest.mark.parametrize("kind", ["archive", "directory"])
def test_loader_decodes_then_hits_the_cache(tmp_path, monkeypatch, kind):
  files = _files()
  if kind == "archive":
    source = make_archive(tmp_path / "tiny.tar.xz", files, prefix="tiny/")
  else:
    source = make_folder(tmp_path / "tiny", files)
  cache = tmp_path / "cache"

  arrays = image_folder.load_image_folder(str(source), str(cache),
                                          progress=False)

  expected = _expected(files)
  for key, value in expected.items():
    np.testing.assert_array_equal(arrays[key], value, err_msg=key)
  assert arrays["x_train"].dtype == np.uint8
  assert arrays["x_train"].shape == (9, 32, 32, 3)
  assert list(arrays["classes"]) == list(CLASSES)
  cached = list(cache.iterdir())
  assert len(cached) == 1 and cached[0].name.startswith("tiny-")
  assert cached[0].suffix == ".npz"

  # Second load: from the cache, nothing decoded.
  _fail_decoding(monkeypatch)
  again = image_folder.load_image_folder(str(source), str(cache),
                                         progress=False)
  for key, value in expected.items():
    np.testing.assert_array_equal(again[key], value, err_msg=key)


def test_cache_key_follows_the_source(tmp_path, monkeypatch):
  source = make_folder(tmp_path / "tiny")
  cache = str(tmp_path / "cache")
  image_folder.load_image_folder(str(source), cache, progress=False)
  # The key hashes relative paths, sizes and mtimes: a new file is a miss.
  (source / "train" / "cat" / "9999.jpg").write_bytes(_jpeg(99))
  _fail_decoding(monkeypatch)
  with pytest.raises(AssertionError, match="decoded"):
    image_folder.load_image_folder(str(source), cache, progress=False)
  files = image_folder._directory_files(str(source))
  key = image_folder.directory_key(str(source), files)
  assert key == image_folder.directory_key(str(source), files[::-1])


def test_archive_key_is_the_files_sha256(tmp_path):
  path = make_archive(tmp_path / "a.tar.xz")
  assert image_folder.file_sha256(str(path)) == hashlib.sha256(
      path.read_bytes()).hexdigest()


def test_load_cifar10_standardises_image_folders(tmp_path):
  files = _files()
  archive = make_archive(tmp_path / "tiny.tar.xz", files)
  folder = make_folder(tmp_path / "tiny", files)
  cache = str(tmp_path / "cache")
  x_tr, y_tr, x_te, y_te = data.load_cifar10(str(archive), cache, False)
  expected = _expected(files)
  raw = expected["x_train"].astype(np.float64) / 255
  mu, sd = raw.mean(axis=(0, 1, 2)), raw.std(axis=(0, 1, 2))
  assert x_tr.dtype == np.float32
  np.testing.assert_allclose(x_tr, (raw - mu) / sd, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(
      x_te, (expected["x_test"] / 255 - mu) / sd, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(y_tr, expected["y_train"])
  np.testing.assert_array_equal(y_te, expected["y_test"])
  # The unpacked directory gives the same arrays (and is dispatched to).
  folder_arrays = data.load_dataset("cifar10", str(folder), cache, False)
  for a, b in zip((x_tr, y_tr, x_te, y_te), folder_arrays, strict=True):
    np.testing.assert_array_equal(a, b)


# -- malformed input ----------------------------------------------------------


def _load(source, tmp_path):
  return image_folder.load_image_folder(str(source), str(tmp_path / "cache"),
                                        progress=False)


def test_missing_source_names_the_path(tmp_path):
  missing = tmp_path / "nowhere.tar.xz"
  with pytest.raises(FileNotFoundError, match=r"nowhere\.tar\.xz"):
    _load(missing, tmp_path)
  with pytest.raises(FileNotFoundError, match=r"nowhere\.tar\.xz"):
    data.load_cifar10(str(missing), str(tmp_path / "cache"), False)


def test_missing_split_folder(tmp_path):
  files = {k: v for k, v in _files().items() if k.startswith("train/")}
  source = make_folder(tmp_path / "tiny", files)
  with pytest.raises(ValueError, match=r"tiny.*has no test/ folder"):
    _load(source, tmp_path)
  # Through the cifar10 entry point too (train/ alone selects this layout).
  with pytest.raises(ValueError, match="test/"):
    data.load_cifar10(str(source), str(tmp_path / "cache"), False)
  archive = make_archive(tmp_path / "train_only.tar.xz", files)
  with pytest.raises(ValueError, match=r"no images in .*train_only.*test/"):
    _load(archive, tmp_path)


def test_class_missing_in_test(tmp_path):
  files = {k: v for k, v in _files().items() if not k.startswith("test/frog")}
  source = make_folder(tmp_path / "tiny", files)
  with pytest.raises(ValueError, match=r"tiny/test/frog is missing"):
    _load(source, tmp_path)
  archive = make_archive(tmp_path / "tiny.tar.xz", files)
  with pytest.raises(ValueError, match=r"tiny.tar.xz/test/frog is missing"):
    _load(archive, tmp_path)


@pytest.mark.parametrize("kind", ["archive", "directory"])
def test_undecodable_and_wrong_size_images(tmp_path, kind):
  for bad, content, message in (
      ("train/cat/0001.jpg", b"not an image", r"cannot decode.*0001\.jpg"),
      ("test/bird/0000.jpg", _jpeg(5, size=(16, 24)),
       r"test/bird/0000\.jpg.* is 16x24 \(HxW\), expected 32x32"),
  ):
    files = {**_files(), bad: content}
    root = tmp_path / f"{kind}-{len(message)}"
    root.mkdir()
    if kind == "archive":
      source = make_archive(root / "tiny.tar.xz", files)
    else:
      source = make_folder(root / "tiny", files)
    with pytest.raises(ValueError, match=message):
      _load(source, root)


def test_misplaced_file_and_broken_archive(tmp_path):
  files = {**_files(), "train/loose.jpg": _jpeg(7)}
  with pytest.raises(ValueError, match=r"train/loose\.jpg"):
    _load(make_folder(tmp_path / "tiny", files), tmp_path)
  broken = tmp_path / "broken.tar.xz"
  broken.write_bytes(b"\xfd7zXZ\x00 truncated")
  with pytest.raises(ValueError, match=r"cannot read archive .*broken"):
    _load(broken, tmp_path)


def test_hidden_files_are_ignored(tmp_path):
  files = {**_files(), "train/cat/.DS_Store": b"junk"}
  arrays = _load(make_folder(tmp_path / "tiny", files), tmp_path)
  assert len(arrays["x_train"]) == 9


# -- augmentation -------------------------------------------------------------


def test_random_crop_flip_is_a_seeded_shift_and_mirror():
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.normal(size=(16, 8, 8, 2)), jnp.float32)
  key = jax.random.PRNGKey(3)
  out = np.asarray(augment.random_crop_flip(key, images, padding=2))
  np.testing.assert_array_equal(
      out, np.asarray(augment.random_crop_flip(key, images, padding=2)))
  assert not np.array_equal(
      out, np.asarray(augment.random_crop_flip(jax.random.PRNGKey(4), images,
                                               padding=2)))
  padded = np.pad(np.asarray(images), ((0, 0), (2, 2), (2, 2), (0, 0)))
  flips = 0
  for i in range(len(images)):
    candidates = []
    for dy in range(5):
      for dx in range(5):
        crop = padded[i, dy:dy + 8, dx:dx + 8]
        candidates += [(crop, False), (crop[:, ::-1], True)]
    match = [f for c, f in candidates if np.array_equal(out[i], c)]
    assert match, i  # every output is a crop of the padded image, maybe flipped
    flips += match[0]
  assert 0 < flips < len(images)
