"""The UNet's attention, forward and backward: the hand-written backward pass (`unet._attend`,
a `jax.custom_vjp`) against autodiff of the same formula, interleaved in one process so both
see the same machine load.

    python benchmarks/bench_attention.py                   # the demo's demo attention at 16x16
    python benchmarks/bench_attention.py --queries=64 --keys=208 --head_dim=16   # ... at 8x8

Defaults are configs/demo.py's apprentice step: batch 8, 256 queries (16x16), 3 demos x (256 +
16 caption tokens) = 816 keys, 4 heads of 8. Prints milliseconds (median over rounds) for the
value and gradients of sum(sin(attention)) and for the forward pass alone, and the largest
difference between the two gradients.
"""
from __future__ import annotations

import argparse
import json
import math
import time

import jax
import jax.numpy as jnp
import numpy as np

from suti import hostmem
from suti.nn import unet


def attend_by_autodiff(q, k, v, mask):
  """The formula `_attend` computes, left to JAX's autodiff (what it replaced)."""
  logits = jnp.einsum("bnhd,bmhd->bhnm", q, k) / math.sqrt(q.shape[-1])
  logits = jnp.where(mask[:, None, None, :], logits, jnp.finfo(jnp.float32).min)
  weights = jax.nn.softmax(logits, axis=-1) * mask[:, None, None, :]
  return jnp.einsum("bhnm,bmhd->bnhd", weights, v)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--queries", type=int, default=256)
  parser.add_argument("--keys", type=int, default=816)
  parser.add_argument("--heads", type=int, default=4)
  parser.add_argument("--head_dim", type=int, default=8)
  parser.add_argument("--rounds", type=int, default=15)
  args = parser.parse_args()
  b, n, m, h, d = args.batch, args.queries, args.keys, args.heads, args.head_dim
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.standard_normal(s), jnp.float32)
             for s in ((b, n, h, d), (b, m, h, d), (b, m, h, d)))
  mask = jnp.asarray(rng.random((b, m)) > 0.1)  # demo dropout drops some demos' tokens
  programs = {}
  for name, attend in (("hand_written", unet._attend), ("autodiff", attend_by_autodiff)):
    loss = lambda q, k, v, attend=attend: jnp.sum(jnp.sin(attend(q, k, v, mask)))  # noqa: E731
    programs[name, "grad"] = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
    programs[name, "forward"] = jax.jit(lambda q, k, v, attend=attend: attend(q, k, v, mask))
  outputs, times = {}, {key: [] for key in programs}
  for key, fn in programs.items():  # compile and warm up
    outputs[key] = jax.block_until_ready(fn(q, k, v))
  for _ in range(args.rounds):
    for key, fn in programs.items():
      start = time.perf_counter()
      jax.block_until_ready(fn(q, k, v))
      times[key].append(time.perf_counter() - start)
  ours, theirs = (jax.tree.leaves(outputs[name, "grad"]) for name in ("hand_written", "autodiff"))
  diff = max(float(jnp.max(jnp.abs(a - c))) for a, c in zip(ours, theirs))
  print(json.dumps({
      "shape": {"batch": b, "queries": n, "keys": m, "heads": h, "head_dim": d},
      "ms": {f"{name}/{kind}": round(1e3 * float(np.median(t)), 1)
             for (name, kind), t in times.items()},
      "max_grad_difference": diff}, indent=1))


if __name__ == "__main__":
  hostmem.reexec_with_huge_pages()  # what suti.launch runs with
  main()
