"""Test set-up: 8 simulated CPU devices, set before jax is imported."""

import os

_FLAG = "--xla_force_host_platform_device_count=8"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (
      os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()

import jax  # noqa: E402  (after XLA_FLAGS on purpose)

jax.config.update("jax_default_matmul_precision", "highest")


import gc  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
  """Drop each module's compiled programs when it is done.

  Every XLA:CPU executable keeps memory mappings alive; a single process
  compiling the whole suite's thousands of programs runs into the kernel's
  vm.max_map_count (65530) and segfaults inside the compiler.
  """
  yield
  jax.clear_caches()
  gc.collect()
