"""Base model throughput on this machine: the pretrain train step and the DDPM / DDIM samplers.

    python benchmarks/bench_pretrain.py --config=configs/demo.py
    python benchmarks/bench_pretrain.py --config=configs/tiny.py --set=pretrain.batch_size=32

Train step: images/s and achieved FLOP/s (XLA's cost analysis of the compiled step / the
median step time), as a fraction of the f32 matmul peak (benchmarks/matmul_peak.py, measured
here unless --peak_gflops is given). Samplers: images/s of `TextToImage.sample` (text encoding
included) at --sample_batch prompts with classifier-free guidance. Every program is compiled
and run once before timing; figures are medians. The persistent compilation cache is not
enabled, so compile times are cold (unless JAX_COMPILATION_CACHE_DIR is set in the environment).
"""
from __future__ import annotations

import argparse
import ast
import importlib.util
import json
import os
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np

import matmul_peak
from suti import hostmem
from suti import plan
from suti import pretrain
from suti import train_lib
from suti.model import TextToImage
from suti.nn.unet import count_params


def load_config(spec: str, overrides=()):
  """configs/x.py[:arg] plus key=value overrides (values parsed as Python literals)."""
  path, _, arg = spec.partition(":")
  module_spec = importlib.util.spec_from_file_location("bench_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  config = module.get_config(arg or None)
  for item in overrides:
    key, _, value = item.partition("=")
    *parents, leaf = key.split(".")
    node = config
    for p in parents:
      node = node[p]
    try:
      value = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      pass  # a bare string
    node[leaf] = value
  return config


def _median_seconds(fn, repeats: int) -> tuple[float, list[float]]:
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return float(np.median(times)), times


def bench_train(config, model, trainable, frozen, steps: int) -> dict:
  """Compile (timed), 2 warm-up steps, then `steps` timed steps one by one."""
  pc = config.pretrain
  tx = train_lib.make_optimizer(pc.optimizer, pc.learning_rate, pc.warmup_steps)
  trainable = jax.tree.map(jnp.copy, trainable)  # the step donates its params: keep the caller's
  opt_state = tx.init(trainable)
  rng = np.random.default_rng(0)
  size = config.image_size
  tokens = model.tokenize(["a red ball on the grass"] * pc.batch_size)
  batch = {"image": rng.uniform(-1, 1, (pc.batch_size, size, size, 3)).astype(np.float32),
           **tokens}
  jitted = jax.jit(pretrain.make_train_step(model, tx, config.seed), donate_argnums=(0, 1))
  start = time.perf_counter()
  step_fn = jitted.lower(trainable, opt_state, frozen, batch, jnp.int32(0)).compile()
  compile_seconds = time.perf_counter() - start
  flops = plan.cost_dict(step_fn.cost_analysis()).get("flops", float("nan"))
  state = {"trainable": trainable, "opt_state": opt_state, "step": 0}

  def one_step():
    out = step_fn(state["trainable"], state["opt_state"], frozen, batch,
                  jnp.int32(state["step"]))
    state["trainable"], state["opt_state"], metrics = out
    state["step"] += 1
    return metrics

  _median_seconds(one_step, 2)  # warm-up
  median, times = _median_seconds(one_step, steps)
  return {"batch_size": pc.batch_size, "compile_seconds": compile_seconds,
          "step_seconds": median, "step_seconds_min": min(times),
          "step_seconds_max": max(times), "images_per_second": pc.batch_size / median,
          "flops_per_step": flops, "achieved_gflops": flops / median / 1e9}


def bench_sampler(config, model, trainable, frozen, sampler: str, steps: int,
                  guidance: float, batch: int, repeats: int) -> dict:
  prompts = ["a red ball on the grass"] * batch
  rng = jax.random.PRNGKey(0)
  run = lambda: model.sample(trainable, frozen, prompts, rng, sampler=sampler, steps=steps,
                             guidance=guidance)
  start = time.perf_counter()
  jax.block_until_ready(run())
  first_seconds = time.perf_counter() - start  # compile + one run
  median, _ = _median_seconds(run, repeats)
  # FLOPs of one denoising step (lowered, not compiled: a second compile only for this
  # would double the benchmark's time; the two analyses agree within ~1-2% on these models).
  one = plan.measure(plan.sample_program("base", "sample", config, model, trainable["unet"],
                                         batch, sampler=sampler, guidance=guidance),
                     plan.Context(1, 0), compile_=False)
  return {"sampler": sampler, "steps": steps, "guidance": guidance, "batch": batch,
          "first_call_seconds": first_seconds, "seconds": median,
          "images_per_second": batch / median, "seconds_per_step": median / steps,
          "flops_per_step": one["flops"],
          "achieved_gflops": one["flops"] * steps / median / 1e9}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default="configs/demo.py")
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="config override, e.g. --set=model.channels=48 (repeatable)")
  parser.add_argument("--train_steps", type=int, default=10, help="timed train steps")
  parser.add_argument("--sample_batch", type=int, default=8)
  parser.add_argument("--guidance", type=float, default=3.0)
  parser.add_argument("--samplers", default="ddpm:100,ddim:50", help="sampler:steps,...")
  parser.add_argument("--sample_repeats", type=int, default=3)
  parser.add_argument("--peak_gflops", type=float, default=0.0,
                      help="f32 matmul peak; 0: measure it (benchmarks/matmul_peak.py)")
  parser.add_argument("--json", default="", help="also write the results here")
  args = parser.parse_args()

  config = load_config(args.config, args.set)
  peak = args.peak_gflops or matmul_peak.peak_gflops((2048,), repeats=10)[0]
  model = TextToImage(config)
  trainable, frozen = model.init(jax.random.PRNGKey(config.seed))
  m = config.model
  print(f"{args.config} {' '.join(args.set)}: {config.image_size}px, channels {m.channels}, "
        f"mult {tuple(m.channel_mult)}, {m.num_res_blocks} res block(s), "
        f"{count_params(trainable) / 1e6:.2f}M trainable params; jax {jax.__version__} on "
        f"{jax.device_count()} {jax.default_backend()} device(s); peak {peak:.1f} GFLOP/s")

  train = bench_train(config, model, trainable, frozen, args.train_steps)
  print(f"train  batch {train['batch_size']:3d}: {train['step_seconds'] * 1e3:8.1f} ms/step "
        f"(min {train['step_seconds_min'] * 1e3:.1f}, max {train['step_seconds_max'] * 1e3:.1f}), "
        f"{train['images_per_second']:7.1f} img/s, {train['flops_per_step'] / 1e9:.2f} GFLOP/step, "
        f"{train['achieved_gflops']:.1f} GFLOP/s = {train['achieved_gflops'] / peak:.0%} of peak; "
        f"compile {train['compile_seconds']:.1f} s")
  samplers = []
  for item in filter(None, args.samplers.split(",")):
    name, _, steps = item.partition(":")
    r = bench_sampler(config, model, trainable, frozen, name, int(steps), args.guidance,
                      args.sample_batch, args.sample_repeats)
    samplers.append(r)
    print(f"sample {name} {r['steps']:4d} steps, batch {r['batch']}, guidance {r['guidance']}: "
          f"{r['seconds']:6.2f} s, {r['images_per_second']:6.2f} img/s, "
          f"{r['seconds_per_step'] * 1e3:.1f} ms/step, {r['achieved_gflops']:.1f} GFLOP/s = "
          f"{r['achieved_gflops'] / peak:.0%} of peak; first call {r['first_call_seconds']:.1f} s")
  load = os.getloadavg()[0]
  print(f"load average {load:.1f} at the end (other processes share these cores)")
  if args.json:
    out = {"load_average": load, "config": args.config, "overrides": args.set,
           "jax": jax.__version__, "params": count_params(trainable), "peak_gflops": peak,
           "train": train, "samplers": samplers, "date": time.strftime("%Y-%m-%d %H:%M")}
    pathlib.Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
  hostmem.reexec_with_huge_pages()  # what suti.launch runs with
  main()
