"""Does the base know its categories? The measure of a base good enough for SuTI's experts.

    python benchmarks/probe_base_category.py --out=categories.png
    python benchmarks/probe_base_category.py --set=pretrain.base_checkpoint=W/pretrain/checkpoints

An expert can only draw its subject's shape if the base it starts from ties the category word
to a shape. Three numbers say whether it does, on the embedded world:

- category gain at t: how much smaller the base's error on a subject's pixels is (its x0
  estimate from x_t, on oracle renders of held-out subjects) when the prompt names the
  subject's category than when it names another one; same image, noise and background word.
  0% means the base draws the same thing for 'a star' as for 'a fish'.
- colour gain at t: the same with a wrong colour word, on renders recoloured by the prompt
  ('a red star'): a word that also acts on the subject's pixels (the control: the base can
  condition the subject on its prompt).
- background gain at t: the same with a wrong background word, on the background's pixels.
- text spread: how far apart the text encoder puts the 15 categories' prompts, against the 11
  backgrounds' (the centred token states' mean norm), at init and trained.

--out writes a grid, a row per category: 4 oracle renders | the base's 4 samples of the same
prompts (DDIM-40, guidance 2). Needs no workdir: the world and the base are the config's.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # pylint: disable=wrong-import-position
import jax.numpy as jnp  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position

from bench_pretrain import load_config  # pylint: disable=wrong-import-position
from suti import config_lib, diffusion, pretrain, train_lib  # pylint: disable=wrong-import-position
from suti.data import world as world_lib  # pylint: disable=wrong-import-position

STEPS = (200, 400, 600, 800)
GRID_BACKGROUNDS = ("plain", "grass", "night", "beach")


def _other(options, value, rng):
  """A uniformly drawn member of `options` that is not `value`."""
  rest = [o for o in options if o != value]
  return rest[int(rng.integers(len(rest)))]


def prompt_gains(model, trainable, frozen, world, num_subjects: int, seed: int = 0) -> dict:
  """{t: {'category' | 'color' | 'background': % gain, 'subject_error': x0 MSE}} on held-out
  renders: the first half of the images plain ('a star on the grass'), the second recoloured
  ('a red star on the grass'); the colour gain is measured on the second half."""
  rng = np.random.default_rng(seed)
  images, masks, prompts = [], [], {"right": [], "category": [], "color": [], "background": []}
  for recolour in (False, True):
    for i, subject in enumerate(world.subjects("eval", num_subjects)):
      background = world_lib.BACKGROUNDS[int(rng.integers(len(world_lib.BACKGROUNDS)))]
      color = world_lib.COLORS[int(rng.integers(len(world_lib.COLORS)))] if recolour else None
      scene = world_lib.Scene(background, color=color)
      image, mask = world.render(subject, world_lib.format_prompt(subject.category, scene),
                                 1000 + 2 * i + recolour)
      images.append(train_lib.to_model_space(image))
      masks.append(mask)
      other_color = _other(world_lib.COLORS, color, rng) if recolour else None
      for name, category, wrong_scene in (
          ("right", subject.category, scene),
          ("category", _other(world_lib.CATEGORIES, subject.category, rng), scene),
          ("color", subject.category, world_lib.Scene(background, color=other_color)),
          ("background", subject.category,
           world_lib.Scene(_other(world_lib.BACKGROUNDS, background, rng), color=color))):
        prompts[name].append(world_lib.format_prompt(category, wrong_scene))
  x0 = jnp.asarray(np.stack(images))
  subject_px = jnp.asarray(np.stack(masks), jnp.float32)[..., None]
  recoloured = (jnp.arange(x0.shape[0]) >= num_subjects)[:, None, None, None]
  conds = {name: model.encode(trainable, frozen, model.tokenize(p)) for name, p in prompts.items()}

  @jax.jit
  def x0_errors(x_t, t, cond):  # t: a step index of the schedule
    steps = jnp.full((x0.shape[0],), t)
    out = model.denoise_fn(trainable["unet"], x_t, model.schedule.timesteps[steps], cond)
    _, x0_hat = diffusion.to_eps_x0(model.schedule, model.prediction, out, x_t, steps)
    err = (x0_hat - x0) ** 2
    mean_over = lambda px: (err * px).sum() / (3 * px.sum())
    return (mean_over(subject_px), mean_over(subject_px * recoloured),
            mean_over(1 - subject_px))

  gains = {}
  for t in STEPS:
    errors = {name: np.zeros(3) for name in conds}  # subject, recoloured subject, background
    for k in range(4):  # noise draws
      noise = jax.random.normal(jax.random.PRNGKey(k), x0.shape)
      x_t = diffusion.q_sample(model.schedule, x0, jnp.full((x0.shape[0],), t), noise)
      for name, cond in conds.items():
        errors[name] += np.asarray(x0_errors(x_t, t, cond)) / 4
    gains[t] = {
        "category": round(100 * (1 - errors["right"][0] / errors["category"][0]), 2),
        "color": round(100 * (1 - errors["right"][1] / errors["color"][1]), 2),
        "background": round(100 * (1 - errors["right"][2] / errors["background"][2]), 2),
        "subject_error": round(float(errors["right"][0]), 4)}
  return gains


def text_spread(model, trainable, frozen) -> dict:
  """Mean norm of the centred token states of prompts that differ in one word."""
  def spread(prompts):
    cond = model.encode(trainable, frozen, model.tokenize(prompts))
    tokens = np.asarray(cond["tokens"] * cond["mask"][..., None]).reshape(len(prompts), -1)
    return float(np.linalg.norm(tokens - tokens.mean(0), axis=1).mean())
  categories = [world_lib.format_prompt(c, world_lib.Scene("grass"))
                for c in world_lib.CATEGORIES]
  backgrounds = [world_lib.format_prompt("star", world_lib.Scene(b))
                 for b in world_lib.BACKGROUNDS]
  return {"categories": round(spread(categories), 2), "backgrounds": round(spread(backgrounds), 2)}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default="configs/demo.py")
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
  parser.add_argument("--subjects", type=int, default=32, help="held-out subjects (2 renders each)")
  parser.add_argument("--out", default="", help="PNG grid: oracle renders | base samples")
  args = parser.parse_args()

  config = config_lib.validate(load_config(args.config, args.set))
  if not config.pretrain.base_checkpoint:
    raise SystemExit("--config needs pretrain.base_checkpoint (configs/demo.py's: "
                     "embedded:world_base_16_v3, or --set pretrain.base_checkpoint=DIR)")
  model, trainable, frozen = pretrain.load_base(config, os.devnull)
  world = world_lib.from_config(config)
  untrained, untrained_frozen = model.init(jax.random.PRNGKey(config.seed))
  result = {"base": config.pretrain.base_checkpoint,
            "gains_percent": prompt_gains(model, trainable, frozen, world, args.subjects),
            "text_spread": text_spread(model, trainable, frozen),
            "text_spread_at_init": text_spread(model, untrained, untrained_frozen)}
  print(json.dumps(result))
  if args.out:
    subjects = world.train_pool(200)
    rows = []
    for category in world_lib.CATEGORIES:
      subject = next(s for s in subjects if s.category == category)
      prompts = [world_lib.format_prompt(category, world_lib.Scene(b)) for b in GRID_BACKGROUNDS]
      oracle = [world.render(subject, p, 3)[0] for p in prompts]
      drawn = model.sample(trainable, frozen, prompts, jax.random.PRNGKey(0), sampler="ddim",
                           steps=40, guidance=2.0)
      rows += oracle + list(train_lib.to_uint8(drawn))
    train_lib.save_grid(args.out, np.stack(rows), columns=8)


if __name__ == "__main__":
  main()
