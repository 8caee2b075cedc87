"""Does the apprentice take its subject from the demos at high noise? (embedded world only)

    python benchmarks/probe_apprentice_x0.py --workdir=W --out=x0.png

A sample's layout and the subject's shape are decided at high noise; an apprentice that copies
must predict its demos' subject there, not its base's blob. From W's apprentice checkpoint,
on held-out subjects: the oracle render of a new prompt, noised to t, and the apprentice's
one-step estimate of x0 given the subject's own demos and given another subject's demos
(same image, noise and prompt).

- demo gain at t: how much smaller the error of that estimate on the subject's pixels is
  with its own demos than with another subject's. 0% means the demos are not read at t.

--out writes a grid, a row per subject: the target | x0 with own demos, with another
subject's demos, at each t.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=wrong-import-position
import jax.numpy as jnp  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position

from apprentice import generate as gen  # pylint: disable=wrong-import-position
from suti import diffusion, train_lib  # pylint: disable=wrong-import-position
from suti.data import world as world_lib  # pylint: disable=wrong-import-position

STEPS = (300, 500, 700, 850)
DEMO_BACKGROUNDS = ("plain", "grass", "beach")
TARGET_BACKGROUND = "snow"


def _demos(world, subject, seed):
  prompts = [world_lib.format_prompt(subject.category, world_lib.Scene(b))
             for b in DEMO_BACKGROUNDS]
  return np.stack([world.render(subject, p, seed + k)[0] for k, p in enumerate(prompts)]), prompts


def x0_estimates(model, trainable, frozen, world, num_subjects: int, steps=STEPS, seed: int = 0):
  """(targets uint8 [S, H, W, 3], masks bool [S, H, W], x0 float [S, len(steps), 2, H, W, 3]):
  the apprentice's x0 from each noised target with [own, another subject's] demos."""
  subjects = world.subjects("eval", num_subjects)
  if len(subjects) < 2:
    raise ValueError("the probe needs at least 2 held-out subjects (another subject's demos)")
  rng = np.random.default_rng(seed)
  predict = jax.jit(lambda p, x_t, t, batch: model.denoise_fn(
      p["unet"], x_t, t, model.condition(p, frozen, batch)))
  targets, masks, estimates = [], [], []
  for i, subject in enumerate(subjects):
    prompt = world_lib.format_prompt(subject.category, world_lib.Scene(TARGET_BACKGROUND))
    target, mask = world.render(subject, prompt, 1000 + i)
    x0 = jnp.asarray(train_lib.to_model_space(target[None]))
    noise = jnp.asarray(rng.standard_normal(x0.shape), jnp.float32)
    batches = [dict(model.tokenize([prompt]), **gen.demo_batch(model, *_demos(world, s, 10 * i)))
               for s in (subject, subjects[(i + 1) % len(subjects)])]
    row = []
    for t in steps:
      t_ = jnp.full((1,), t, jnp.int32)
      x_t = diffusion.q_sample(model.schedule, x0, t_, noise)
      row.append([np.asarray(diffusion.to_eps_x0(
          model.schedule, model.prediction, predict(trainable, x_t, t_, b), x_t, t_)[1])[0]
                  for b in batches])
    targets.append(target)
    masks.append(mask)
    estimates.append(row)
  return np.stack(targets), np.stack(masks), np.asarray(estimates, np.float32)


def demo_gains(targets, masks, estimates, steps=STEPS) -> dict:
  """{t: % smaller x0 error on the subject's pixels with own demos than with another's}."""
  x0 = train_lib.to_model_space(targets)[:, None, None]
  error = (((estimates - x0) ** 2).mean(-1) * masks[:, None, None]).sum((-2, -1))  # [S, T, 2]
  own, other = error[..., 0].sum(0), error[..., 1].sum(0)
  return {int(t): round(float(100 * (1 - a / b)), 2) for t, a, b in zip(steps, own, other)}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", required=True, help="a workdir with an apprentice checkpoint")
  parser.add_argument("--subjects", type=int, default=16, help="held-out subjects")
  parser.add_argument("--out", default="", help="PNG grid: target | x0 own, other at each t")
  args = parser.parse_args()
  model, trainable, frozen = gen.load(pathlib.Path(args.workdir) / "apprentice" / "checkpoints")
  world = world_lib.from_config(model.config)
  targets, masks, estimates = x0_estimates(model, trainable, frozen, world, args.subjects)
  print(json.dumps({"workdir": args.workdir, "steps": list(STEPS),
                    "demo_gain_percent": demo_gains(targets, masks, estimates)}))
  if args.out:
    rows = []
    for target, row in zip(targets, estimates):
      rows += [target] + list(train_lib.to_uint8(np.clip(row.reshape((-1,) + row.shape[2:]),
                                                         -1, 1)))
    train_lib.save_grid(args.out, np.stack(rows), columns=1 + 2 * len(STEPS))


if __name__ == "__main__":
  main()
