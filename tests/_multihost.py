"""Launches N real JAX processes on localhost (jax.distributed over gloo).

Used by ``tests/test_multihost.py``; no jax import here, so the launcher
works from a process whose jax already runs with other devices.

A worker is a Python module run as ``python -m MODULE ARGS... --coordinator
127.0.0.1:PORT --num-processes N --process-id I`` with ``XLA_FLAGS`` giving
it ``devices_per_process`` simulated CPU devices; it calls
:func:`initialize` before anything touches a device.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
  """A TCP port on 127.0.0.1 that nothing listens on right now."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def worker_env(devices_per_process: int) -> dict[str, str]:
  """The parent's environment with the worker's own device count."""
  env = dict(os.environ)
  flags = [f for f in env.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  flags.append(f"--xla_force_host_platform_device_count={devices_per_process}")
  env["XLA_FLAGS"] = " ".join(flags)
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = os.pathsep.join(
      [ROOT] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
  return env


class WorkersFailed(AssertionError):
  """A worker exited with an error or ran past the timeout."""


def launch(module: str, args: list[str], *, num_processes: int,
           devices_per_process: int, timeout: float) -> list[str]:
  """Runs ``python -m module`` as ``num_processes`` coordinated processes.

  Args:
    module: the worker module (run from the repository root).
    args: the worker's own arguments (the coordinator's are appended).
    num_processes: how many processes.
    devices_per_process: simulated CPU devices in each.
    timeout: seconds for all of them together.

  Returns:
    Each process's stdout + stderr.

  Raises:
    WorkersFailed: a worker failed or the time ran out; every worker still
      running is killed and every worker's output is in the message.
  """
  port = free_port()
  env = worker_env(devices_per_process)
  procs = []
  with contextlib.ExitStack() as stack:
    logs = [stack.enter_context(tempfile.TemporaryFile("w+"))
            for _ in range(num_processes)]
    try:
      for i, log in enumerate(logs):
        cmd = [sys.executable, "-u", "-m", module, *args,
               "--coordinator", f"127.0.0.1:{port}",
               "--num-processes", str(num_processes), "--process-id", str(i)]
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log,
                                      stderr=subprocess.STDOUT))
      failed = _wait(procs, timeout)
    finally:
      for p in procs:  # ours only, by handle
        if p.poll() is None:
          p.kill()
        p.wait()
    outputs = []
    for log in logs:
      log.seek(0)
      outputs.append(log.read())
  if failed is not None:
    shown = "\n".join(f"----- worker {i} (exit {p.returncode}) -----\n{out}"
                      for i, (p, out) in enumerate(zip(procs, outputs,
                                                       strict=True)))
    raise WorkersFailed(f"{module}: {failed}\n{shown}")
  return outputs


def _wait(procs, timeout: float) -> str | None:
  """Waits for every process; why they failed, or None."""
  deadline = time.monotonic() + timeout
  while any(p.poll() is None for p in procs):
    bad = [i for i, p in enumerate(procs) if p.returncode not in (None, 0)]
    if bad:
      # One worker died: the others would wait for it until their own
      # collective timeouts.
      return f"worker {bad[0]} exited with {procs[bad[0]].returncode}"
    if time.monotonic() > deadline:
      return f"timeout after {timeout:.0f} s"
    time.sleep(0.1)
  if any(p.returncode != 0 for p in procs):
    return "exit codes " + str([p.returncode for p in procs])
  return None


def initialize(coordinator: str, num_processes: int, process_id: int) -> None:
  """In a worker: CPU collectives over gloo, then ``jax.distributed``."""
  import jax  # noqa: PLC0415  (after XLA_FLAGS, which the launcher set)

  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=coordinator,
                             num_processes=num_processes,
                             process_id=process_id)
