"""This machine's measured float32 matmul peak with jax (GFLOP/s): the yardstick the other
benchmarks divide by. Large square matmuls, best of N repeats per size.

    python benchmarks/matmul_peak.py [--sizes=1024,2048,4096] [--repeats=10] [--json=out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np


def measure(size: int, repeats: int = 10, dtype=jnp.float32) -> dict:
  """Best and median GFLOP/s of one [size, size] @ [size, size] matmul (2 n^3 FLOPs)."""
  rng = np.random.default_rng(0)
  a = jnp.asarray(rng.standard_normal((size, size)), dtype)
  b = jnp.asarray(rng.standard_normal((size, size)), dtype)
  matmul = jax.jit(jnp.matmul)
  matmul(a, b).block_until_ready()  # compile and warm the caches
  seconds = []
  for _ in range(repeats):
    start = time.perf_counter()
    matmul(a, b).block_until_ready()
    seconds.append(time.perf_counter() - start)
  flops = 2.0 * size**3
  return {"size": size, "best_gflops": flops / min(seconds) / 1e9,
          "median_gflops": flops / float(np.median(seconds)) / 1e9}


def peak_gflops(sizes=(1024, 2048, 4096), repeats: int = 10) -> tuple[float, list[dict]]:
  """The best GFLOP/s over all sizes, and every size's figures."""
  results = [measure(s, repeats) for s in sizes]
  return max(r["best_gflops"] for r in results), results


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--sizes", default="1024,2048,4096")
  parser.add_argument("--repeats", type=int, default=10)
  parser.add_argument("--json", default="", help="also write the results here")
  args = parser.parse_args()
  sizes = [int(s) for s in args.sizes.split(",")]
  peak, results = peak_gflops(sizes, args.repeats)
  print(f"jax {jax.__version__}, backend {jax.default_backend()}, "
        f"{jax.device_count()} device(s): {jax.devices()[0].device_kind}")
  for r in results:
    print(f"  f32 matmul {r['size']:5d}^2: best {r['best_gflops']:7.1f} GFLOP/s, "
          f"median {r['median_gflops']:7.1f} GFLOP/s")
  print(f"peak: {peak:.1f} GFLOP/s (best of {args.repeats} per size); load average "
        f"{os.getloadavg()[0]:.1f} (other processes share these cores)")
  if args.json:
    with open(args.json, "w", encoding="utf-8") as f:
      json.dump({"peak_gflops": peak, "sizes": results, "jax": jax.__version__}, f, indent=1)


if __name__ == "__main__":
  main()
