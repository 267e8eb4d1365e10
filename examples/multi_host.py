"""Multi-host data-parallel training of the small CNN of multi_device.py.

One JAX process per host (``jax.distributed``); a mesh over every process's
devices; each process loads only its own rows of every batch and hands them
to the global array with ``jax.make_array_from_process_local_data``. The GBN
layers pool their statistics with ``axis_name="batch"``: the per-channel
counts and sums of every selection pass cross the process boundary (an
all-reduce of a few numbers per channel), the activations never do. At the
end every process checks that all processes hold identical parameters and
``batch_stats``, the train state is saved with orbax (each process writes
its part), and one process restores it and evaluates the same.

On one machine, N local processes with simulated CPU devices, coordinated on
localhost (this launches them and waits):

  python examples/multi_host.py --processes 2 --devices-per-process 2

On a cluster, start the same script once per host, with host 0's address
and a free port as the coordinator, and a checkpoint directory that every
host can write (a shared file system or a bucket):

  # on host I of N (I = 0 .. N-1)
  python examples/multi_host.py --coordinator HOST0:1234 --num-processes N \\
      --process-id I --checkpoint /shared/gbn_ckpt
  # then, anywhere, one process:
  python examples/multi_host.py --evaluate-checkpoint /shared/gbn_ckpt

(On Cloud TPU, SLURM or Open MPI pass ``--auto`` instead of the three
flags: ``jax.distributed.initialize()`` reads them from the environment.)

Data: the synthetic stripes of multi_device.py; process p draws its own rows
of each batch (seeded by step and process) and its rows of the test set.
"""

from __future__ import annotations

import argparse
import functools
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

# The model and data of the one-process example (this folder is on sys.path
# when the script runs).
from multi_device import AXIS, CNN, make_data

N_TEST = 512


def test_set():
  """The whole test set (the same in every process)."""
  return make_data(np.random.default_rng(1), N_TEST)


def init_state(model, tx):
  """The initial train state (host arrays; the same in every process)."""
  x0, _ = make_data(np.random.default_rng(0), 2)
  variables = model.init(jax.random.PRNGKey(0), x0, train=False)
  params = variables["params"]
  return {"params": params, "batch_stats": variables["batch_stats"],
          "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32)}


def evaluate(model, state, x):
  return model.apply({"params": state["params"],
                      "batch_stats": state["batch_stats"]}, x, train=False)


# --------------------------------------------------------------------------
# One process of the multi-process run.
# --------------------------------------------------------------------------


def log(*a):
  """Progress from process 0 only."""
  if jax.process_index() == 0:
    print(*a, flush=True)


def train(args) -> None:
  n_proc, pid = jax.process_count(), jax.process_index()
  devices = jax.devices()  # every process's, ordered by process
  mesh = Mesh(np.array(devices), (AXIS,))
  assert args.batch % len(devices) == 0, "the batch must split over devices"
  assert N_TEST % len(devices) == 0
  local_batch = args.batch // n_proc
  shard = NamedSharding(mesh, P(AXIS))
  replicated = NamedSharding(mesh, P())
  log(f"{n_proc} processes x {jax.local_device_count()} {devices[0].platform}"
      f" devices, global batch {args.batch} ({local_batch} rows loaded per"
      " process)")
  for p in range(n_proc):
    log(f"  process {p}: devices "
        f"{[d.id for d in devices if d.process_index == p]}")

  def global_batch(local):
    """This process's rows -> one array over every process's devices."""
    return jax.make_array_from_process_local_data(shard, local)

  def replicate(tree):
    """Host values (equal in every process) -> replicated global arrays."""
    def put(a):
      a = np.asarray(a)
      return jax.make_array_from_callback(a.shape, replicated,
                                          lambda i: a[i])

    return jax.tree.map(put, tree)

  model = CNN(approximate=args.approximate)
  tx = optax.adam(3e-3)
  state = replicate(init_state(model, tx))

  def local_step(state, x, y):
    """Runs on each device with its slice of the global batch."""

    def loss_fn(params):
      logits, updates = model.apply(
          {"params": params, "batch_stats": state["batch_stats"]},
          x, train=True, mutable=["batch_stats"])
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
      # The global mean loss, differentiated as such: under shard_map the
      # replicated params' gradient is then the global one.
      return lax.pmean(loss, AXIS), updates["batch_stats"]

    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state["params"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    return {"params": optax.apply_updates(state["params"], updates),
            "batch_stats": batch_stats, "opt_state": opt_state,
            "step": state["step"] + 1}, loss

  step = jax.jit(jax.shard_map(local_step, mesh=mesh,
                               in_specs=(P(), P(AXIS), P(AXIS)),
                               out_specs=(P(), P())))

  @jax.jit
  def accuracy(state, x, y):
    return jnp.mean(jnp.argmax(evaluate(model, state, x), -1) == y)

  rows = slice(pid * N_TEST // n_proc, (pid + 1) * N_TEST // n_proc)
  x_test, y_test = (global_batch(a[rows]) for a in test_set())
  start = time.perf_counter()
  for i in range(args.steps):
    # Only this process's rows of the batch are ever loaded here.
    x, y = make_data(np.random.default_rng((args.seed, i, pid)), local_batch)
    state, loss = step(state, global_batch(x), global_batch(y))
    if i % 10 == 0 or i == args.steps - 1:
      acc = accuracy(state, x_test, y_test)
      log(f"step {i:4d}  loss {float(loss):.4f}  test accuracy "
          f"{float(acc):.3f}  ({time.perf_counter() - start:.1f} s)")

  check_identical(state)
  if args.checkpoint:
    save(args.checkpoint, state, evaluate_sharded(model, state, x_test))


def check_identical(state) -> None:
  """Every process holds the same params and batch_stats (and every local
  device the same copy)."""
  from jax.experimental import multihost_utils  # noqa: PLC0415

  held = {k: state[k] for k in ("params", "batch_stats")}

  def local_copy(a):
    copies = [np.asarray(s.data) for s in a.addressable_shards]
    assert all(np.array_equal(c, copies[0]) for c in copies)
    return copies[0]

  multihost_utils.assert_equal(
      jax.tree.map(local_copy, held),
      "the processes' params or batch_stats differ")
  log("every process holds identical params and batch_stats")


def evaluate_sharded(model, state, x_test):
  """Test logits of the whole test set, gathered in every process."""
  from jax.experimental import multihost_utils  # noqa: PLC0415

  logits = jax.jit(functools.partial(evaluate, model))(state, x_test)
  return np.asarray(multihost_utils.process_allgather(logits, tiled=True))


def save(path: str, state, test_logits) -> None:
  """Every process calls save; each writes the parts it holds."""
  import orbax.checkpoint as ocp  # noqa: PLC0415

  path = _dir(path)
  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(path / "state", state)
    ckpt.wait_until_finished()
  if jax.process_index() == 0:
    with (path / "test_logits.npy").open("wb") as f:
      np.save(f, test_logits)
  log(f"train state saved to {path} by all processes")


def _dir(path: str):
  """A local directory (made absolute) or a bucket URL, as an epath."""
  from etils import epath  # noqa: PLC0415  (an orbax dependency)

  return epath.Path(path if "://" in path else os.path.abspath(path))


# --------------------------------------------------------------------------
# One process: restore and evaluate.
# --------------------------------------------------------------------------


def evaluate_checkpoint(path: str, approximate: bool = False) -> None:
  """Restores the train state on one device; its test logits must equal
  those of the multi-process run."""
  import orbax.checkpoint as ocp  # noqa: PLC0415

  path = _dir(path)
  model = CNN(approximate=approximate)
  one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(
      lambda a: jax.ShapeDtypeStruct(np.shape(a), a.dtype, sharding=one),
      init_state(model, optax.adam(3e-3)))
  with ocp.StandardCheckpointer() as ckpt:
    state = ckpt.restore(path / "state", target)
  x_test, y_test = test_set()
  logits = np.asarray(jax.jit(functools.partial(evaluate, model))(state,
                                                                  x_test))
  with (path / "test_logits.npy").open("rb") as f:
    want = np.load(f)
  np.testing.assert_allclose(logits, want, rtol=1e-5, atol=1e-5)
  acc = np.mean(np.argmax(logits, -1) == y_test)
  print(f"one process, one device: restored step {int(state['step'])},"
        f" test accuracy {acc:.3f}, test logits equal the multi-process run's"
        f" (max difference {np.max(np.abs(logits - want)):.1e})")


# --------------------------------------------------------------------------
# Launching local processes.
# --------------------------------------------------------------------------


def launch(args) -> None:
  """Runs this script as ``args.processes`` coordinated local processes."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  env = dict(os.environ)
  flags = [f for f in env.get("XLA_FLAGS", "").split()
           if "xla_force_host_platform_device_count" not in f]
  flags.append("--xla_force_host_platform_device_count="
               f"{args.devices_per_process}")
  env.update(XLA_FLAGS=" ".join(flags), JAX_PLATFORMS="cpu")
  tmp = None
  if not args.checkpoint:
    tmp = args.checkpoint = tempfile.mkdtemp(prefix="gbn_multi_host_")
  start = time.perf_counter()
  procs, logs = [], []
  try:
    for i in range(args.processes):
      # Process 0 prints; the others' output is shown if one fails.
      log_file = (None if i == 0
                  else tempfile.TemporaryFile("w+"))  # noqa: SIM115
      logs.append(log_file)
      cmd = [sys.executable, "-u", os.path.abspath(__file__),
             "--steps", str(args.steps), "--batch", str(args.batch),
             "--seed", str(args.seed), "--checkpoint", args.checkpoint,
             *(["--approximate"] if args.approximate else []),
             "--coordinator", f"127.0.0.1:{port}",
             "--num-processes", str(args.processes), "--process-id", str(i)]
      procs.append(subprocess.Popen(
          cmd, env=env, stdout=log_file,
          stderr=None if log_file is None else subprocess.STDOUT))
    failed = None
    while failed is None and any(p.poll() is None for p in procs):
      if any(p.returncode not in (None, 0) for p in procs):
        failed = "a process failed"
      elif time.perf_counter() - start > args.timeout:
        failed = f"timeout after {args.timeout} s"
      time.sleep(0.2)
    if failed is None and any(p.returncode for p in procs):
      failed = "a process failed"
  finally:
    for p in procs:  # ours, by handle
      if p.poll() is None:
        p.kill()
      p.wait()
  for i, (p, f) in enumerate(zip(procs, logs, strict=True)):
    if f is not None:
      if failed is not None:
        f.seek(0)
        print(f"----- process {i} (exit {p.returncode}) -----\n{f.read()}",
              file=sys.stderr)
      f.close()
  if failed is not None:
    sys.exit(f"{failed}; exit codes {[p.returncode for p in procs]}")
  print(f"{args.processes} processes done in "
        f"{time.perf_counter() - start:.1f} s")
  evaluate_checkpoint(args.checkpoint, args.approximate)
  if tmp is not None:
    shutil.rmtree(tmp)
  print(f"total {time.perf_counter() - start:.1f} s")


def main():
  ap = argparse.ArgumentParser(
      description=__doc__,
      formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--steps", type=int, default=60)
  ap.add_argument("--batch", type=int, default=128, help="global batch size")
  ap.add_argument("--approximate", action="store_true")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--checkpoint", help="directory for the train state (every"
                  " process must reach it); default: a temporary one locally")
  local = ap.add_argument_group("local processes")
  local.add_argument("--processes", type=int, default=2)
  local.add_argument("--devices-per-process", type=int, default=2,
                     help="simulated CPU devices in each")
  local.add_argument("--timeout", type=float, default=1800)
  cluster = ap.add_argument_group("one process of a cluster run")
  cluster.add_argument("--coordinator", help="host:port of process 0")
  cluster.add_argument("--num-processes", type=int)
  cluster.add_argument("--process-id", type=int)
  cluster.add_argument("--auto", action="store_true",
                       help="jax.distributed.initialize() with no arguments")
  ap.add_argument("--evaluate-checkpoint", metavar="DIR",
                  help="one process: restore DIR and compare its test logits")
  args = ap.parse_args()

  if args.evaluate_checkpoint:
    evaluate_checkpoint(args.evaluate_checkpoint, args.approximate)
  elif args.auto or args.process_id is not None:
    # CPU collectives across processes (no effect on GPU/TPU).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if args.auto:
      jax.distributed.initialize()
    else:
      jax.distributed.initialize(coordinator_address=args.coordinator,
                                 num_processes=args.num_processes,
                                 process_id=args.process_id)
    train(args)
  else:
    launch(args)


if __name__ == "__main__":
  main()
