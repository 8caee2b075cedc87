"""Compile time of the experts' packed train step, and what the compiled program is made of.

    python benchmarks/bench_compile.py --config=configs/demo.py --experts=8 --pack=split
    python benchmarks/bench_compile.py --config=configs/tiny.py --experts=2 --pack=vmap

Lowers and compiles one device's step of E experts (experts.parallel, as stage `experts`
builds it), then times --steps steps on zero images. Prints one JSON line: lower and compile
seconds, seconds a step, and the optimised HLO's size and counts of scalar-heavy instructions
(the NaN guard's blow-up showed as ~10^5 `and`s; docs/RESULTS.md, issue 7, 2026-11-30).
Start it with a cold compilation cache (the default: none) to time the compile.
"""
from __future__ import annotations

import argparse
import json
import re
import time


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default="configs/demo.py")
  parser.add_argument("--experts", type=int, default=8, help="experts on the one device (E)")
  parser.add_argument("--pack", default="auto", help="experts.parallel pack mode")
  parser.add_argument("--steps", type=int, default=3)
  args = parser.parse_args()

  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from experts import parallel  # pylint: disable=import-outside-toplevel
  from suti import config_lib, train_lib  # pylint: disable=import-outside-toplevel
  from suti.model import TextToImage  # pylint: disable=import-outside-toplevel

  config = config_lib.validate(config_lib.load_config_file(args.config))
  ec, size, count = config.experts, config.image_size, args.experts
  model = TextToImage(config)
  unet, shared = parallel.split_base(*model.init(jax.random.PRNGKey(0)))
  tx = train_lib.make_optimizer(ec.optimizer, ec.learning_rate)
  stacked = parallel.stack_experts(unet, count)
  opt_state = parallel.init_opt_state(tx, stacked)
  pack = parallel.resolve_pack(args.pack, count, jax.default_backend())
  single = parallel.make_single_step(model, tx, config.seed)
  in_axes = (0, 0, None, 0, None, 0, None)
  step = parallel._packed(single, pack, in_axes)  # pylint: disable=protected-access
  tokens = model.tokenize(["a photo"] * ec.batch_size)
  batch = {"image": jnp.zeros((count, ec.batch_size, size, size, 3)),
           "ids": jnp.asarray(np.stack([tokens["ids"]] * count)),
           "mask": jnp.asarray(np.stack([tokens["mask"]] * count))}
  inputs = (stacked, opt_state, shared, batch, jnp.int32(0), jnp.arange(count, dtype=jnp.int32),
            jnp.int32(0))

  start = time.perf_counter()
  lowered = jax.jit(step).lower(*inputs)
  lowered_at = time.perf_counter()
  compiled = lowered.compile()
  compiled_at = time.perf_counter()
  jax.block_until_ready(compiled(*inputs))
  timed_from = time.perf_counter()
  for _ in range(args.steps):
    jax.block_until_ready(compiled(*inputs))
  step_seconds = (time.perf_counter() - timed_from) / args.steps

  text = compiled.as_text()
  print(json.dumps({
      "config": args.config, "experts": count, "pack": pack, "backend": jax.default_backend(),
      "lower_seconds": round(lowered_at - start, 2),
      "compile_seconds": round(compiled_at - lowered_at, 2),
      "step_seconds": round(step_seconds, 4),
      "hlo_chars": len(text), "fusions": len(re.findall(r" fusion\(", text)),
      "and": text.count(" and("), "add": text.count(" add("), "select": text.count(" select("),
  }))


if __name__ == "__main__":
  main()
