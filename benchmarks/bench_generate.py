"""Time to a personalised image: the apprentice in context vs the expert path, and demo count.

    python benchmarks/bench_generate.py --config=configs/demo.py
    python benchmarks/bench_generate.py --config=configs/demo.py --set=experts.num_steps=500

For one new world subject (5 images), in one process:
  expert path:  fine-tune one expert from the base (config.experts: steps, batch, Adafactor;
                `experts.parallel.finetune`), then sample num_images images of the prompt with
                classifier-free guidance (the DreamBooth analogue);
  in context:   `apprentice.generate.generate` with num_inference_demos demos (demo features
                encoded once), guidance mode of config.apprentice.
Both sample with config.apprentice's sampler and steps. Each path runs once to compile
(first_call_seconds), then --repeats times; the medians are reported. Timing does not depend
on the weights' values, so the models are initialised rather than trained (the apprentice from
the base, as the stage does). Also times in-context generation with 1..5 demos: the demo
features are computed once per call, so the cost of more demos is the demo attention only.
Prints one JSON document.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position

from apprentice import generate as gen  # pylint: disable=wrong-import-position
from apprentice.model import Apprentice  # pylint: disable=wrong-import-position
from bench_pretrain import load_config  # pylint: disable=wrong-import-position
from experts import parallel  # pylint: disable=wrong-import-position
from suti import hostmem  # pylint: disable=wrong-import-position
from suti.data import world as world_lib  # pylint: disable=wrong-import-position
from suti.model import TextToImage  # pylint: disable=wrong-import-position


def parse_args():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default="configs/demo.py")
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
  parser.add_argument("--num_images", type=int, default=4)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--max_demos", type=int, default=5)
  parser.add_argument("--json", default="")
  return parser.parse_args()


def timed(fn, repeats):
  """(first call seconds, median of `repeats` further calls)."""
  start = time.perf_counter()
  fn()
  first = time.perf_counter() - start
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return round(first, 3), round(float(np.median(times)), 3)


def main():
  args = parse_args()
  config = load_config(args.config, ["experts.num_experts=1", *args.set])
  ac = config.apprentice
  world = world_lib.from_config(config)
  subject = world.subjects("eval", 1)[0]
  cluster = world.cluster(subject, args.max_demos, 1)
  prompt = cluster.prompts[0]

  base = TextToImage(config)
  base_params, frozen = base.init(jax.random.PRNGKey(0))
  base_unet, shared = parallel.split_base(base_params, frozen)
  model = Apprentice(config)
  params = model.init_from_base(base_params, jax.random.PRNGKey(1))
  sample_experts = parallel.make_expert_sampler(
      base, sampler=ac.sampler, steps=ac.sample_steps, guidance=config.experts.guidance)
  tokens = base.tokenize([prompt] * args.num_images)
  tokens = {k: v[None] for k, v in tokens.items()}

  def expert_path():
    stacked, _, _ = parallel.finetune(config, base, base_unet, shared, [cluster], 0)
    images = sample_experts(stacked, shared, tokens, jax.random.PRNGKey(0), np.arange(1))
    return np.asarray(images)

  demos = list(cluster.images)

  def in_context(n):
    return lambda: gen.generate(model, params, frozen, demos[:n], prompt,
                                captions=cluster.captions[:n], num_images=args.num_images)

  result = {"config": args.config, "overrides": args.set, "device": str(jax.devices()[0]),
            "image_size": config.image_size, "num_images": args.num_images,
            "sampler": ac.sampler, "sample_steps": ac.sample_steps,
            "expert_steps": config.experts.num_steps,
            "expert_batch": config.experts.batch_size,
            "guidance_mode": ac.guidance_mode}
  first, median = timed(expert_path, args.repeats)
  result["expert_path"] = {"first_call_seconds": first, "seconds": median}
  first, median = timed(in_context(ac.num_inference_demos), args.repeats)
  result["in_context"] = {"demos": ac.num_inference_demos, "first_call_seconds": first,
                          "seconds": median}
  result["speedup"] = round(result["expert_path"]["seconds"] / median, 2)
  result["speedup_first_call"] = round(result["expert_path"]["first_call_seconds"] / first, 2)
  by_demos = {}
  for n in range(1, args.max_demos + 1):
    by_demos[n] = timed(in_context(n), args.repeats)[1]
  result["seconds_by_demos"] = by_demos
  result["demos_5_over_1"] = round(by_demos[args.max_demos] / by_demos[1], 3)
  print(json.dumps(result, indent=1))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(result, f, indent=1)


if __name__ == "__main__":
  hostmem.reexec_with_huge_pages()  # what suti.launch runs with
  main()
