"""Expert fine-tuning throughput: K experts packed in one compiled step vs one after another.

    python benchmarks/bench_experts.py --config=configs/demo.py
    python benchmarks/bench_experts.py --ks=1,4,16 --steps=2 --compare_packs=split,vmap,map

Subject-steps/s = experts x steps / seconds. "sequential" fine-tunes the K experts one after
another with the unpacked jitted step (experts.parallel.make_sequential_step), in this process;
"packed" runs all K in one step (make_expert_train_step) in each pack mode (see
experts/parallel.py): 'vmap' (a vmapped convolution over per-expert kernels is one grouped
convolution), 'split' (vmap with those convolutions split per expert; what 'auto' picks on
CPU), 'map' (lax.map over the experts inside the step), 'unroll' (K copies of the per-expert
program). Batches are random images and fixed captions, already on the device, so both sides
time the device step only (host batch drawing is the same for both). Every program is compiled
and run once before timing (first_call_seconds); sequential and packed steps of the comparison
are timed round-robin so that they see the same machine load; figures are medians of --steps
timed steps. --devices=N fakes N CPU devices on the 'expert' mesh axis (K must divide by N).
--hlo also counts the grouped convolutions (feature_group_count > 1) in each compiled step.
Prints one JSON document.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time


def parse_args():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default="configs/demo.py")
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="config override, e.g. --set=experts.batch_size=2 (repeatable)")
  parser.add_argument("--ks", default="1,4,16,64", help="K values for the packed scaling")
  parser.add_argument("--packs", default="auto", help="pack modes for the scaling, comma list")
  parser.add_argument("--compare_k", type=int, default=4,
                      help="K for packed vs sequential (0: skip the comparison)")
  parser.add_argument("--compare_packs", default="auto,vmap",
                      help="pack modes in the packed vs sequential comparison")
  parser.add_argument("--steps", type=int, default=3, help="timed steps per measurement")
  parser.add_argument("--devices", type=int, default=1, help="fake CPU devices (mesh size)")
  parser.add_argument("--hlo", action="store_true",
                      help="also compile each --compare_packs step on one device and count its "
                           "grouped convolutions and FLOPs")
  parser.add_argument("--json", default="", help="also write the results here")
  return parser.parse_args()


ARGS = parse_args()
if ARGS.devices > 1:  # before jax is imported
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             f" --xla_force_host_platform_device_count={ARGS.devices}")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=wrong-import-position
import jax.numpy as jnp  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position

from bench_pretrain import load_config  # pylint: disable=wrong-import-position
from experts import parallel  # pylint: disable=wrong-import-position
from suti import hostmem  # pylint: disable=wrong-import-position
from suti import mesh as mesh_lib  # pylint: disable=wrong-import-position
from suti import plan  # pylint: disable=wrong-import-position
from suti import train_lib  # pylint: disable=wrong-import-position
from suti.model import TextToImage  # pylint: disable=wrong-import-position
from suti.nn.unet import count_params  # pylint: disable=wrong-import-position


def random_batch(config, model, num_experts, rng):
  """{'image' [K, B, H, W, 3], 'ids', 'mask'}: noise images and a few world captions."""
  b, size = config.experts.batch_size, config.image_size
  captions = ["a red ball on the grass", "a blue cat in the snow", "a green box on a table"]
  tokens = model.tokenize([captions[i % len(captions)] for i in range(b)])
  return {"image": rng.uniform(-1, 1, (num_experts, b, size, size, 3)).astype(np.float32),
          "ids": np.broadcast_to(tokens["ids"], (num_experts,) + tokens["ids"].shape).copy(),
          "mask": np.broadcast_to(tokens["mask"], (num_experts,) + tokens["mask"].shape).copy()}


def _run_timed(fn):
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


def packed_runner(config, model, unet, shared, k, pack, mesh):
  """(one packed step of k experts, blocking; seconds of its first call: compile + run)."""
  ec = config.experts
  tx = train_lib.make_optimizer(ec.optimizer, ec.learning_rate)
  stacked = parallel.stack_experts(unet, k, mesh)
  opt_state = parallel.init_opt_state(tx, stacked, mesh)
  batch = random_batch(config, model, k, np.random.default_rng(0))
  ids = np.arange(k, dtype=np.int32)
  if mesh is not None:
    batch, ids = parallel.shard_experts((batch, ids), mesh)
    shared = mesh_lib.replicate(shared, mesh)
  else:
    batch = jax.device_put(batch)
  step_fn = parallel.make_expert_train_step(model, tx, config.seed, mesh=mesh, pack=pack)
  state = {"unet": stacked, "opt": opt_state, "step": 0}

  def one():  # blocks on every step (as mesh.needs_blocking asks of fake CPU devices anyway)
    out = step_fn(state["unet"], state["opt"], shared, batch, state["step"], ids, 0)
    jax.block_until_ready(out)
    state["unet"], state["opt"], _ = out
    state["step"] += 1

  return one, _run_timed(one)


def sequential_runner(config, model, unet, shared, k):
  """(one step of each of k experts one after another, k dispatches; first-call seconds)."""
  ec = config.experts
  tx = train_lib.make_optimizer(ec.optimizer, ec.learning_rate)
  step_fn = parallel.make_sequential_step(model, tx, config.seed)
  batch = jax.device_put(random_batch(config, model, k, np.random.default_rng(0)))
  one_batch = [jax.tree.map(lambda x, e=e: x[e], batch) for e in range(k)]
  experts = []
  for _ in range(k):
    params = jax.tree.map(jnp.copy, unet)
    experts.append([params, tx.init(params)])
  state = {"step": 0}

  def one():
    # The loop over experts is the sequential schedule; steps of one expert depend on each
    # other, experts do not, so the order only matters for timing granularity.
    for e in range(k):
      experts[e][0], experts[e][1], loss = step_fn(experts[e][0], experts[e][1], shared,
                                                   one_batch[e], state["step"], e, 0)
    jax.block_until_ready(loss)
    state["step"] += 1

  return one, _run_timed(one)


def interleaved(runners: dict, steps: int) -> dict:
  """Times `steps` calls of each runner, round-robin so that all see the same machine load."""
  times = {name: [] for name in runners}
  for _ in range(steps):
    for name, fn in runners.items():
      times[name].append(_run_timed(fn))
  return times


def summary(k, times, first, batch_per_expert, **extra):
  median = float(np.median(times))
  return dict(extra, k=k, first_call_seconds=first, step_seconds=median,
              step_seconds_min=min(times), step_seconds_all=times,
              subject_steps_per_second=k / median,
              images_per_second=k * batch_per_expert / median)


def hlo_facts(config, model, unet, shared, k, pack):
  """The compiled one-device step: its compile seconds, grouped convolutions and their
  feature_group_count, and counts of scalar-heavy instructions (the NaN guard's blow-up showed
  as ~10^5 `and`s; docs/RESULTS.md, issue 7, 2026-11-30)."""
  ec = config.experts
  tx = train_lib.make_optimizer(ec.optimizer, ec.learning_rate)
  stacked = jax.eval_shape(lambda u: parallel.stack_experts(u, k), unet)
  opt_state = jax.eval_shape(jax.vmap(tx.init), stacked)
  batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                       random_batch(config, model, k, np.random.default_rng(0)))
  single = parallel.make_single_step(model, tx, config.seed)
  fn = parallel._packed(single, parallel.resolve_pack(pack, k),  # pylint: disable=protected-access
                        (0, 0, None, 0, None, 0, None))
  scalar = jax.ShapeDtypeStruct((), jnp.int32)
  lowered = jax.jit(fn).lower(stacked, opt_state, shared, batch, scalar,
                              jax.ShapeDtypeStruct((k,), jnp.int32), scalar)
  start = time.perf_counter()
  text = lowered.compile().as_text()
  compile_seconds = time.perf_counter() - start
  convs = [l for l in text.splitlines() if " convolution(" in l]
  groups = [int(g) for g in re.findall(r"feature_group_count=(\d+)", "\n".join(convs))]
  return {"compile_seconds": round(compile_seconds, 2), "hlo_chars": len(text),
          "and": text.count(" and("), "add": text.count(" add("),
          "select": text.count(" select("),
          "convolutions": len(convs), "grouped_convolutions": len(groups),
          "feature_group_counts": sorted(set(groups)),
          "flops": plan.cost_dict(lowered.cost_analysis()).get("flops", float("nan"))}


def main():
  config = load_config(ARGS.config, ARGS.set)
  model = TextToImage(config)
  trainable, frozen = model.init(jax.random.PRNGKey(config.seed))
  unet, shared = parallel.split_base(trainable, frozen)
  mesh = mesh_lib.make_mesh("expert", ARGS.devices) if ARGS.devices > 1 else None
  ec = config.experts
  header = {"config": ARGS.config, "overrides": ARGS.set, "image_size": config.image_size,
            "unet_params": count_params(unet), "batch_per_expert": ec.batch_size,
            "optimizer": ec.optimizer, "devices": ARGS.devices, "jax": jax.__version__,
            "backend": jax.default_backend(), "steps": ARGS.steps}
  print(json.dumps(header), file=sys.stderr, flush=True)
  result = dict(header, compare=None, scaling=[])
  bpe = ec.batch_size
  runners = {}  # (k, pack) -> (runner, first-call seconds): compiled once, reused below

  def packed(k, pack):
    if (k, pack) not in runners:
      runners[k, pack] = packed_runner(config, model, unet, shared, k, pack, mesh)
    return runners[k, pack]

  if ARGS.compare_k:
    k = ARGS.compare_k
    seq, seq_first = sequential_runner(config, model, unet, shared, k)
    packs = [p for p in ARGS.compare_packs.split(",") if p]
    fns = {"sequential": seq, **{p: packed(k, p)[0] for p in packs}}
    times = interleaved(fns, ARGS.steps)
    seq_summary = summary(k, times["sequential"], seq_first, bpe)
    compare = {"k": k, "sequential": seq_summary, "packed": {}}
    for p in packs:
      r = summary(k, times[p], runners[k, p][1], bpe,
                  pack=parallel.resolve_pack(p, k // ARGS.devices))
      r["speedup_vs_sequential"] = (r["subject_steps_per_second"] /
                                    seq_summary["subject_steps_per_second"])
      if ARGS.hlo:
        r["hlo"] = hlo_facts(config, model, unet, shared, k, p)
      compare["packed"][p] = r
    result["compare"] = compare
    print(f"K={k}: sequential {seq_summary['subject_steps_per_second']:.2f} subject-steps/s; "
          + ", ".join(f"{p} {r['subject_steps_per_second']:.2f} "
                      f"({r['speedup_vs_sequential']:.2f}x)"
                      for p, r in compare["packed"].items()), file=sys.stderr, flush=True)
  for pack in filter(None, ARGS.packs.split(",")):
    for k in [int(x) for x in ARGS.ks.split(",") if x]:
      fn, first = packed(k, pack)
      times = [_run_timed(fn) for _ in range(ARGS.steps)]
      r = summary(k, times, first, bpe, pack=parallel.resolve_pack(pack, k // ARGS.devices))
      result["scaling"].append(r)
      print(f"packed {pack} K={k}: {r['step_seconds']:.3f} s/step, "
            f"{r['subject_steps_per_second']:.2f} subject-steps/s", file=sys.stderr,
            flush=True)
  result["load_average"] = os.getloadavg()[0]
  result["date"] = time.strftime("%Y-%m-%d %H:%M")
  print(json.dumps(result, indent=1))
  if ARGS.json:
    with open(ARGS.json, "w", encoding="utf-8") as f:
      json.dump(result, f, indent=1)


if __name__ == "__main__":
  hostmem.reexec_with_huge_pages()  # what suti.launch runs with
  main()
