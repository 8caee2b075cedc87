"""Train-step throughput at several batch sizes, interleaved in one process so that every size
sees the same machine load (a shared machine drifts too much for separate runs to compare).

    python benchmarks/train_batch_ab.py --config=configs/demo.py --batch_sizes=4,8,16,32
"""
from __future__ import annotations

import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

import bench_pretrain
from suti import hostmem
from suti import pretrain
from suti import train_lib
from suti.model import TextToImage


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default="configs/demo.py")
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
  parser.add_argument("--batch_sizes", default="4,8,16,32")
  parser.add_argument("--rounds", type=int, default=8, help="rounds after one warm-up round")
  parser.add_argument("--steps_per_round", type=int, default=4)
  args = parser.parse_args()
  config = bench_pretrain.load_config(args.config, args.set)
  model = TextToImage(config)
  trainable, frozen = model.init(jax.random.PRNGKey(config.seed))
  pc = config.pretrain
  tx = train_lib.make_optimizer(pc.optimizer, pc.learning_rate, pc.warmup_steps)
  jitted = jax.jit(pretrain.make_train_step(model, tx, config.seed), donate_argnums=(0, 1))
  size = config.image_size
  runs = {}
  for b in (int(s) for s in args.batch_sizes.split(",")):
    params = jax.tree.map(jnp.copy, trainable)  # each size donates its own copy
    batch = {"image": np.random.default_rng(0).uniform(-1, 1, (b, size, size, 3)).astype(
        np.float32), **model.tokenize(["a red ball on the grass"] * b)}
    step_fn = jitted.lower(params, tx.init(params), frozen, batch, jnp.int32(0)).compile()
    runs[b] = {"fn": step_fn, "state": (params, tx.init(params)), "batch": batch, "times": []}
  for round_ in range(args.rounds + 1):
    for run in runs.values():
      params, opt_state = run["state"]
      for i in range(args.steps_per_round):
        start = time.perf_counter()
        params, opt_state, metrics = run["fn"](params, opt_state, frozen, run["batch"],
                                               jnp.int32(i))
        jax.block_until_ready(metrics)
        if round_:  # round 0 warms up
          run["times"].append(time.perf_counter() - start)
      run["state"] = (params, opt_state)
  for b, run in runs.items():
    median = float(np.median(run["times"]))
    print(f"batch {b:3d}: {median * 1e3:7.1f} ms/step (fastest {min(run['times']) * 1e3:.1f}), "
          f"{b / median:6.1f} images/s")
  print(f"load average {os.getloadavg()[0]:.1f} (other processes share these cores)")


if __name__ == "__main__":
  hostmem.reexec_with_huge_pages()  # what suti.launch runs with
  main()
