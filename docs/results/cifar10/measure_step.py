"""Time one training step (batch 128, 32x32x3) of the CIFAR-10 models.

Sizes the CIFAR-10 study's budget. For each (model, norm): compiles a chunk of
``--steps`` SGD steps (the harness's own program: augmentation, momentum 0.9,
lax.scan), runs it ``--repeats`` times, and prints the median wall-clock time
per step and the process CPU time per step (on a loaded machine the wall
clock exceeds the CPU time). Random images; the step's cost does not depend
on the pixel values.

  python docs/results/cifar10/measure_step.py --models resnet20 cnn \\
      --norms bn gbn-superquantile
"""

import argparse
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "..", "examples"))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from harness import models, training  # noqa: E402


def measure(model_name, norm, alpha, steps, repeats, batch):
  spec = models.expand_norms([norm], [alpha])[0]
  cfg = training.RunConfig(dataset="cifar10", model=model_name, steps=steps,
                           batch_size=batch, eval_every=steps, augment=True,
                           progress=False,
                           scan=training.uses_scan(model_name))
  rng = np.random.default_rng(0)
  n = 4 * batch
  data = (rng.normal(size=(n, 32, 32, 3)).astype(np.float32),
          rng.integers(0, 10, n).astype(np.int32),
          rng.normal(size=(100, 32, 32, 3)).astype(np.float32),
          rng.integers(0, 10, 100).astype(np.int32))
  device_data = training.to_device(data, 100)
  t0 = time.perf_counter()
  programs = training.norm_programs(spec, cfg, device_data)
  compile_s = time.perf_counter() - t0
  key = jax.random.PRNGKey(0)
  params, stats, opt_state = programs.init(key, device_data.x_train[:2])
  state = (params, stats, opt_state, jnp.float32(0.1), key)
  idx = training.batch_indices(0, n, steps, batch)
  ts = np.arange(steps, dtype=np.int32)
  walls, cpus = [], []
  for _ in range(repeats):
    w, c = time.perf_counter(), time.process_time()
    state, _ = programs.run_steps(state, device_data.x_train,
                                       device_data.y_train, idx, ts)
    jax.block_until_ready(state)
    walls.append((time.perf_counter() - w) / steps)
    cpus.append((time.process_time() - c) / steps)
  return compile_s, statistics.median(walls), statistics.median(cpus)


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--models", nargs="+", default=["resnet20", "cnn"])
  p.add_argument("--norms", nargs="+", default=["bn", "gbn-superquantile"])
  p.add_argument("--alpha", type=float, default=0.5)
  p.add_argument("--steps", type=int, default=3, help="steps per timed call")
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--batch-size", type=int, default=128)
  args = p.parse_args()
  flags = os.environ.get("XLA_FLAGS", "")
  print(f"jax {jax.__version__}, {os.cpu_count()} cpus, load average"
        f" {os.getloadavg()[0]:.1f}, XLA_FLAGS={flags!r}")
  print("| model | norm | compile (s) | wall s / step | cpu s / step |")
  print("|---|---|---|---|---|")
  for model_name in args.models:
    for norm in args.norms:
      compile_s, wall, cpu = measure(model_name, norm, args.alpha, args.steps,
                                     args.repeats, args.batch_size)
      print(f"| {model_name} | {norm} | {compile_s:.1f} | {wall:.3f} |"
            f" {cpu:.3f} |", flush=True)
  print(f"load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
  main()
