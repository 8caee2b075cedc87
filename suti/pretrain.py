"""Stage `pretrain`: the base text-to-image model on the world's training subjects.

Reads workdir/data (train pairs, eval prompts for sample grids); writes workdir/pretrain/:
checkpoints/ (Orbax: trainable params, optimizer state, data position), logs/ (TensorBoard and
metrics.jsonl), samples/step_NNNNNN.png, summary.json. Data-parallel over the mesh's `data`
axis; re-running resumes from the last checkpoint, or returns at once when training is done.
"""
from __future__ import annotations

import json
import logging
import pathlib
import time

import jax
import numpy as np
import optax

from suti import assets
from suti import checkpoint as checkpoint_lib
from suti import files
from suti import mesh as mesh_lib
from suti import train_lib
from suti.config_lib import InputError
from suti.data import pipeline
from suti.data import world as world_lib
from suti.model import TextToImage
from suti.nn.unet import count_params

log = logging.getLogger("suti.pretrain")


def stage_dir(workdir) -> pathlib.Path:
  return pathlib.Path(workdir) / "pretrain"


def resolve_base_checkpoint(value: str) -> pathlib.Path:
  """A pretrain.base_checkpoint value -> its directory ('embedded:NAME' (suti/assets) or a
  path), as the paper starts from a pre-trained Imagen."""
  return assets.resolve(value, "pretrain.base_checkpoint")


def base_checkpoint_dir(config, workdir) -> pathlib.Path:
  """Where the base model lives: the configured checkpoint, else this workdir's pretrain."""
  if config.pretrain.base_checkpoint:
    return resolve_base_checkpoint(config.pretrain.base_checkpoint)
  return stage_dir(workdir) / "checkpoints"


# The config sections a base checkpoint's weights are tied to: made with other values, the
# weights do not fit this model or mean something else (another noise schedule or target).
BASE_FIELDS = ("image_size", "model", "diffusion")
# ... except these run-time settings, which may differ from the pre-training run's.
RUNTIME_FIELDS = ("model.dropout", "model.dtype", "model.text_encoder.path",
                  "diffusion.dynamic_threshold_percentile")


def _first_difference(saved, current, path: str) -> str | None:
  if path in RUNTIME_FIELDS:
    return None
  if isinstance(saved, dict) and isinstance(current, dict):
    for key in sorted(saved):  # keys the checkpoint lacks came after it: nothing to compare
      found = _first_difference(saved[key], current.get(key), f"{path}.{key}")
      if found:
        return found
    return None
  return None if saved == current else f"{path}: checkpoint {saved!r}, config {current!r}"


def check_base_config(saved: dict | None, config, directory) -> None:
  """Raises InputError naming the first field where the checkpoint's config differs."""
  if saved is None:
    return  # a checkpoint saved without its config: nothing to compare
  for field in BASE_FIELDS:
    value = config[field]
    current = json.loads(value.to_json()) if hasattr(value, "to_json") else value
    found = _first_difference(saved.get(field), current, field)
    if found:
      raise InputError(f"base checkpoint {directory} was made with another model: {found}. "
                       f"Use a config with the checkpoint's values, or pre-train with "
                       f"pretrain.base_checkpoint=''")


def load_base(config, workdir, model: TextToImage | None = None):
  """(model, trainable, frozen) of the pre-trained base model, for the later stages."""
  model = model or TextToImage(config)
  directory = base_checkpoint_dir(config, workdir)
  template, _ = model.abstract_init()
  with checkpoint_lib.Checkpoints(directory, read_only=True) as ckpt:
    check_base_config(ckpt.read_config(), config, directory)
    restored = ckpt.restore(params=template, data_state=False)
  if restored is None:
    raise FileNotFoundError(f"no base model checkpoint in {directory}; run the pretrain stage "
                            f"or set pretrain.base_checkpoint")
  return model, restored.params, model.frozen_params()


def make_optimizer(pc) -> optax.GradientTransformation:
  """config.pretrain's optimizer: warmup, then constant or (lr_schedule 'cosine') decayed to
  zero at num_steps."""
  return train_lib.make_optimizer(pc.optimizer, pc.learning_rate, pc.warmup_steps,
                                  decay_steps=train_lib.decay_steps(pc))


def make_train_step(model: TextToImage, tx: optax.GradientTransformation, seed: int):
  """The pure update: (trainable, opt_state, frozen, batch, step) -> (trainable, opt_state,
  metrics). Noise and timesteps come from fold_in(seed, step), so a resumed run draws the
  same numbers as an uninterrupted one."""
  base_rng = jax.random.PRNGKey(seed)

  def train_step(trainable, opt_state, frozen, batch, step):
    rng = jax.random.fold_in(base_rng, step)
    loss, grads = jax.value_and_grad(model.loss)(trainable, frozen, batch, rng)
    updates, opt_state = tx.update(grads, opt_state, trainable)
    trainable = optax.apply_updates(trainable, updates)
    return trainable, opt_state, {"loss": loss, "grad_norm": optax.tree.norm(grads)}

  return train_step


def make_transform(model: TextToImage, caption_dropout: float, world=None, subjects=(),
                   oracle_fraction: float = 0.0):
  """One (image, caption) record -> model inputs; drops the caption for guidance.

  With `oracle_fraction` > 0 (the embedded world) that share of records is replaced by the
  oracle's render of one of `subjects` for a random prompt of the whole grammar. The dataset's
  captions only name a background, yet the experts and the apprentice are asked for recolours,
  accessories and art styles: a real base (Imagen) learnt those from the web's captions long
  before it met a subject, and this is the world's stand-in for that.
  """

  def transform(record, rng: np.random.Generator):
    image, caption = record["image"], record["caption"]
    if oracle_fraction and rng.random() < oracle_fraction:
      subject = subjects[int(rng.integers(len(subjects)))]
      caption = world.prompt(subject, world_lib.random_scene(rng))
      image, _ = world.render(subject, caption, int(rng.integers(2**31)))
    caption = caption if rng.random() >= caption_dropout else ""
    tokens = model.tokenize([caption])
    return {"image": train_lib.to_model_space(image),
            "ids": tokens["ids"][0], "mask": tokens["mask"][0]}

  return transform


def oracle_subjects(config, world) -> list:
  """The world train-split subjects whose oracle renders pre-training mixes in (none when
  pretrain.oracle_fraction is 0). Eval identities are partitioned off by the world, so none of
  them can leak into the base."""
  if not config.pretrain.oracle_fraction:
    return []
  return world.train_pool(config.pretrain.oracle_subjects)


def sample_prompts(data_dir, count: int) -> list[str]:
  """Fixed held-out prompts for the sample grids: eval subjects' captions and unseen prompts."""
  prompts = []
  for cluster in pipeline.ClusterSource(data_dir, "eval"):
    prompts += [cluster.captions[0]] + cluster.prompts[:1]
    if len(prompts) >= count:
      break
  return (prompts * count)[:count] if prompts else ["a ball"] * count


def data_iterator(config, model: TextToImage, workdir):
  """This process's pre-training batches (the workdir's pairs, mixed with oracle renders),
  from the start; a checkpoint's data_state moves it on."""
  pc = config.pretrain
  pairs = pipeline.PairSource(pipeline.ClusterSource(pathlib.Path(workdir) / "data", "train"))
  world = world_lib.from_config(config) if pc.oracle_fraction else None
  transform = make_transform(model, pc.caption_dropout, world, oracle_subjects(config, world),
                             pc.oracle_fraction)
  return pipeline.make_iterator(pairs, batch_size=pc.batch_size // jax.process_count(),
                                seed=config.seed, random_transform=transform)


def run(config, workdir) -> dict:
  workdir = pathlib.Path(workdir)
  out = stage_dir(workdir)
  pc = config.pretrain
  if pc.base_checkpoint:
    model, trainable, _ = load_base(config, workdir)
    summary = {"base_checkpoint": pc.base_checkpoint, "params": count_params(trainable),
               "trained": False}
    provenance = assets.provenance(base_checkpoint_dir(config, workdir))
    if provenance is not None:
      summary["provenance"] = provenance
    return summary
  summary_path = out / "summary.json"
  ckpt = checkpoint_lib.Checkpoints.from_config(out / "checkpoints", config)
  if (ckpt.latest_step() or 0) >= pc.num_steps and summary_path.exists():
    ckpt.close()
    log.info("pretrain: complete at step %d; skipping", pc.num_steps)
    return json.loads(summary_path.read_text())

  model = TextToImage(config)
  mesh = mesh_lib.mesh_from_config(config, "data")
  if pc.batch_size % mesh.size:
    raise ValueError(f"pretrain.batch_size ({pc.batch_size}) must be divisible by the "
                     f"{mesh.size} devices of the 'data' mesh axis")
  tx = make_optimizer(pc)
  trainable, frozen = model.init(jax.random.PRNGKey(config.seed))
  opt_state = tx.init(trainable)

  data = data_iterator(config, model, workdir)
  restored = ckpt.restore(params=trainable, opt_state=opt_state)
  step = 0
  if restored is not None:
    trainable, opt_state, step = restored.params, restored.opt_state, restored.step
    data.set_state(restored.data_state)
    log.info("pretrain: resumed from step %d", step)

  replicated = mesh_lib.replicate((trainable, opt_state, frozen), mesh)
  trainable, opt_state, frozen = replicated
  repl_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  train_step = jax.jit(make_train_step(model, tx, config.seed), donate_argnums=(0, 1),
                       out_shardings=(repl_sharding, repl_sharding, repl_sharding))
  prompts = sample_prompts(workdir / "data", pc.num_samples)
  writer = train_lib.MetricWriter(out / "logs")
  start_step, start_time = step, time.time()

  def save_samples(at_step, trainable):
    images = model.sample(trainable, frozen, prompts, jax.random.PRNGKey(config.seed + 1),
                          sampler=pc.sample_sampler, steps=pc.sample_steps,
                          guidance=pc.sample_guidance)
    grid = train_lib.save_grid(out / "samples" / f"step_{at_step:06d}.png",
                               train_lib.to_uint8(images), columns=min(8, len(prompts)))
    writer.image(at_step, "samples", grid)

  try:
    trainable, opt_state, step, last_loss = train_lib.fit(
        "pretrain", pc, train_step=train_step, trainable=trainable, opt_state=opt_state,
        frozen=frozen, data=data, mesh=mesh, ckpt=ckpt, writer=writer, step=step,
        save_samples=save_samples, config=config)
  finally:
    ckpt.close()
    writer.close()

  seconds = time.time() - start_time
  summary = {"steps": step, "final_loss": last_loss, "params": count_params(trainable),
             "images_per_second": round((step - start_step) * pc.batch_size / seconds, 2),
             "devices": mesh.size, "checkpoint": str(out / "checkpoints"),
             "samples": str(out / "samples" / f"step_{step:06d}.png")}
  files.write_json(summary_path, summary)
  return summary
