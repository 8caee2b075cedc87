"""Does the apprentice read its demos? Train it on oracle targets and measure the demo gain.

    python benchmarks/probe_demo_gain.py --workdir=WORKDIR --steps=1000 \
        --set=apprentice.demo_attention_resolutions=(8,) --set=apprentice.freeze_base=True \
        --set=apprentice.learning_rate=2e-3 --set=apprentice.high_noise_fraction=0.5 \
        --set=apprentice.loss_weight_cap=20.0

WORKDIR is a run of the config (the `data` and `pretrain` stages are enough). Instead of the
experts' buffer the apprentice trains on the world's *oracle* targets, rendered on the fly: a
train subject in one of its unseen prompts, with three of its images as demos. So whatever it
fails to learn here, it would not learn from experts either. --copy makes the target one of
the subject's own images (the easiest possible in-context task); --overfit trains on the fixed
evaluation batch.

Every --eval_every steps, on 16 held-out subjects x 2 prompts, at fixed noise and t in
{50, 200, 400, 600, 800, 950}: the plain eps loss given the subject's own demos, the next
subject's demos, and no demos. demo_gain = loss(next subject's demos) - loss(own demos): > 0
only if the demos are read. --lr_base_scale (default 1: the config's recipe) scales the base's
learning rate; --lr_new_scale the new layers'. Prints one JSON line per evaluation.
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
import jax.numpy as jnp  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position
import optax  # pylint: disable=wrong-import-position

from apprentice import data as data_lib  # pylint: disable=wrong-import-position
from apprentice.model import Apprentice, new_layer_labels  # pylint: disable=wrong-import-position
from bench_pretrain import load_config  # pylint: disable=wrong-import-position
from suti import hostmem  # pylint: disable=wrong-import-position
from suti import config_lib, diffusion, pretrain, train_lib  # pylint: disable=wrong-import-position
from suti.data import pipeline  # pylint: disable=wrong-import-position
from suti.data import world as world_lib  # pylint: disable=wrong-import-position

EVAL_TIMESTEPS = (50, 200, 400, 600, 800, 950)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default="configs/demo.py")
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--steps", type=int, default=1000)
  parser.add_argument("--eval_every", type=int, default=250)
  parser.add_argument("--lr_new_scale", type=float, default=1.0)
  parser.add_argument("--lr_base_scale", type=float, default=1.0)
  parser.add_argument("--copy", action="store_true", help="targets: the subject's own images")
  parser.add_argument("--overfit", action="store_true", help="train on the evaluation batch")
  args = parser.parse_args()

  config = config_lib.validate(load_config(args.config, args.set))
  ac = config.apprentice
  model = Apprentice(config)
  _, base, frozen = pretrain.load_base(config, args.workdir, model=model.base)
  trainable = model.init_from_base(base, jax.random.PRNGKey(config.seed + 2))
  world = world_lib.from_config(config)
  train = list(pipeline.ClusterSource(os.path.join(args.workdir, "data"), "train"))
  held_out = list(pipeline.ClusterSource(os.path.join(args.workdir, "data"), "eval"))
  n = ac.num_train_demos

  def record(cluster, prompt, seed):
    if args.copy:  # one of the subject's own images, with its caption
      i = seed % len(cluster.images)
      image, prompt = cluster.images[i], cluster.captions[i]
    else:
      image, _ = world.render(world_lib.Subject.from_json(cluster.spec), prompt, seed)
    return {"image": image, "demos": np.stack(cluster.images), "prompt": prompt,
            "demo_captions": list(cluster.captions), "subject_id": cluster.subject_id}

  def stack(examples):
    return {k: np.stack([e[k] for e in examples]) for k in examples[0]}

  to_train = data_lib.make_example(model, n, ac.text_dropout, ac.demo_dropout, config.image_size)
  to_eval = data_lib.make_example(model, n, 0.0, 0.0, config.image_size)
  rng = np.random.default_rng(config.seed)
  eval_rng = np.random.default_rng(config.seed + 1)
  own = stack([to_eval(record(c, p, j), eval_rng)
               for c in held_out for j, p in enumerate(c.prompts[:2])])
  count = own["image"].shape[0]
  other = dict(own)
  for key in ("demo_images", "demo_ids", "demo_id_mask", "demo_mask"):
    other[key] = own[key][(np.arange(count) + 2) % count]  # the next subject's (2 prompts each)
  none = dict(own, demo_mask=np.zeros_like(own["demo_mask"]))

  def train_batch():
    picks = [train[i] for i in rng.integers(len(train), size=ac.batch_size)]
    return stack([to_train(record(c, c.prompts[rng.integers(len(c.prompts))],
                                  int(rng.integers(1 << 30))), rng) for c in picks])

  @jax.jit
  def eval_losses(trainable, batch):
    cond = model.condition(trainable, frozen, batch)
    losses = []
    for i, t in enumerate(EVAL_TIMESTEPS):
      noise = jax.random.normal(jax.random.PRNGKey(100 + i), batch["image"].shape)
      losses.append(jnp.mean(diffusion.loss_at(
          model.schedule, model.denoise_fn, trainable["unet"], batch["image"], cond,
          jnp.full((count,), t, jnp.int32), noise, model.prediction)))
    return jnp.stack(losses)

  def optimizer(scale):
    if scale == 0:
      return optax.set_to_zero()
    return train_lib.make_optimizer(ac.optimizer, ac.learning_rate * scale, ac.warmup_steps)

  base_scale = 0.0 if ac.freeze_base else args.lr_base_scale
  tx = optax.multi_transform(
      {"train": optimizer(args.lr_new_scale), "frozen": optimizer(base_scale)},
      new_layer_labels(trainable))
  opt_state = tx.init(trainable)
  step_fn = jax.jit(pretrain.make_train_step(model, tx, config.seed), donate_argnums=(0, 1))

  def report(step, train_loss, seconds):
    own_l, other_l, none_l = (np.asarray(eval_losses(trainable, b)) for b in (own, other, none))
    print(json.dumps({
        "step": step, "train_loss": train_loss, "seconds": round(seconds, 1),
        "loss_own_demos": round(float(own_l.mean()), 5),
        "loss_other_demos": round(float(other_l.mean()), 5),
        "loss_no_demos": round(float(none_l.mean()), 5),
        "demo_gain": round(float((other_l - own_l).mean()), 5),
        "demo_gain_by_t": dict(zip(map(str, EVAL_TIMESTEPS),
                                   (round(float(g), 4) for g in other_l - own_l))),
        "loss_by_t": dict(zip(map(str, EVAL_TIMESTEPS), (round(float(x), 4) for x in own_l)))}),
          flush=True)

  report(0, None, 0.0)
  start, losses = time.time(), []
  for step in range(1, args.steps + 1):
    batch = own if args.overfit else train_batch()
    trainable, opt_state, metrics = step_fn(trainable, opt_state, frozen, batch, step)
    losses.append(float(metrics["loss"]))
    if step % args.eval_every == 0 or step == args.steps:
      report(step, round(float(np.mean(losses[-args.eval_every:])), 5), time.time() - start)


if __name__ == "__main__":
  hostmem.reexec_with_huge_pages()  # what suti.launch runs with
  main()
