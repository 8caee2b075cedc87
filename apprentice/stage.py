"""Stage `apprentice`: SuTI's apprentice trained on the experts' buffer (Eq. 5).

Reads the base checkpoint (the apprentice starts from it: its output equals the base model's
until the new demo layers learn), workdir/experts/buffer (read as a stream: it may still be
growing) and workdir/data's held-out subjects for sample grids. Writes workdir/apprentice/:
  checkpoints/             Orbax: params, optimizer state, data position, config
  logs/                    TensorBoard + metrics.jsonl (loss, grad norm, images/s)
  samples/step_NNNNNN.png  held-out subjects: demos | apprentice sample | oracle render
  summary.json             written when training is done
Data parallel over the mesh's `data` axis; a re-run resumes from the last checkpoint, or
returns at once when training is done.
"""
from __future__ import annotations

import json
import logging
import pathlib
import time

import jax
import numpy as np
import optax

from apprentice import data as data_lib
from apprentice import generate as generate_lib
from apprentice.model import Apprentice, level_channels, new_layer_labels, new_param_count
from experts import stage as experts_stage
from suti import checkpoint as checkpoint_lib
from suti import files
from suti import mesh as mesh_lib
from suti import pretrain
from suti import train_lib
from suti.data import images as images_lib
from suti.data import pipeline
from suti.data import world as world_lib
from suti.nn.unet import count_params

log = logging.getLogger("suti.apprentice")


def stage_dir(workdir) -> pathlib.Path:
  return pathlib.Path(workdir) / "apprentice"


def checkpoint_dir(workdir) -> pathlib.Path:
  return stage_dir(workdir) / "checkpoints"


def buffer_threshold(config) -> float | None:
  """None: the experts' own verdicts; a float: lambda re-applied over every scored sample."""
  threshold = config.apprentice.delta_clip_threshold
  return None if threshold is None else float(threshold)


def make_optimizer(ac, trainable) -> optax.GradientTransformation:
  """config.apprentice's optimizer. With freeze_base the base's params get no updates (and no
  optimizer state); else with base_learning_rate they learn at that rate, the new layers at
  learning_rate. Both follow ac.lr_schedule."""
  decay_steps = train_lib.decay_steps(ac)
  tx = train_lib.make_optimizer(ac.optimizer, ac.learning_rate, ac.warmup_steps,
                                decay_steps=decay_steps)
  if ac.freeze_base:
    base_tx = optax.set_to_zero()
  elif ac.base_learning_rate is not None:
    base_tx = train_lib.make_optimizer(ac.optimizer, ac.base_learning_rate, ac.warmup_steps,
                                       decay_steps=decay_steps)
  else:
    return tx
  return optax.multi_transform({"train": tx, "frozen": base_tx}, new_layer_labels(trainable))


def held_out_examples(config, workdir, count: int) -> list[dict]:
  """Held-out (eval) subjects for sample grids: demos, an unseen prompt, the oracle render."""
  if not count:
    return []
  ac = config.apprentice
  world = world_lib.from_config(config) if config.data.source == "world" else None
  out = []
  for cluster in pipeline.ClusterSource(pathlib.Path(workdir) / "data", "eval"):
    prompt = cluster.prompts[0] if cluster.prompts else cluster.captions[0]
    n = min(ac.num_inference_demos, len(cluster.images))
    oracle = None
    if world is not None and cluster.spec:
      oracle, _ = world.render(world_lib.Subject.from_json(cluster.spec), prompt, config.seed)
    out.append({"subject_id": cluster.subject_id, "demos": np.stack(cluster.images[:n]),
                "captions": list(cluster.captions[:n]), "prompt": prompt, "oracle": oracle})
    if len(out) == count:
      break
  return out


def grid_tiles(examples, samples) -> tuple[np.ndarray, int]:
  """(tiles, columns): a row per subject, demos | apprentice sample | oracle (blank if none)."""
  width = max(len(e["demos"]) for e in examples) + 2
  tiles = []
  for example, sample in zip(examples, samples):
    oracle = [] if example["oracle"] is None else [example["oracle"]]
    tiles += images_lib.pad_row(example["demos"], width - 2) + images_lib.pad_row(
        [sample] + oracle, 2)
  return np.stack(tiles), width


def run(config, workdir) -> dict:
  workdir = pathlib.Path(workdir)
  out = stage_dir(workdir)
  ac = config.apprentice
  summary_path = out / "summary.json"
  ckpt = checkpoint_lib.Checkpoints.from_config(checkpoint_dir(workdir), config)
  if (ckpt.latest_step() or 0) >= ac.num_steps and summary_path.exists():
    ckpt.close()
    log.info("apprentice: complete at step %d; skipping", ac.num_steps)
    return json.loads(summary_path.read_text())
  try:
    return _train(config, workdir, out, ckpt, summary_path)
  finally:
    ckpt.close()


def _train(config, workdir, out, ckpt, summary_path) -> dict:
  ac = config.apprentice
  mesh = mesh_lib.mesh_from_config(config, "data")
  if ac.batch_size % mesh.size:
    raise ValueError(f"apprentice.batch_size ({ac.batch_size}) must be divisible by the "
                     f"{mesh.size} devices of the 'data' mesh axis")
  buffer_dir = experts_stage.buffer_dir(workdir)
  threshold = buffer_threshold(config)
  experts_done = lambda: (experts_stage.stage_dir(workdir) / "summary.json").exists()
  data_lib.wait_for_records(buffer_dir, 1, ac.buffer_wait_s, experts_done, threshold)

  model = Apprentice(config)
  _, base_trainable, frozen = pretrain.load_base(config, workdir, model=model.base)
  trainable = model.init_from_base(base_trainable, jax.random.PRNGKey(config.seed + 2))
  del base_trainable
  tx = make_optimizer(ac, trainable)
  opt_state = tx.init(trainable)
  transform = data_lib.make_example(model, ac.num_train_demos, ac.text_dropout,
                                    ac.demo_dropout, config.image_size)
  data = data_lib.BufferStream(buffer_dir, batch_size=ac.batch_size, seed=config.seed,
                               transform=transform, threshold=threshold)
  restored = ckpt.restore(params=trainable, opt_state=opt_state)
  step = 0
  if restored is not None:
    trainable, opt_state, step = restored.params, restored.opt_state, restored.step
    data.set_state(restored.data_state)
    log.info("apprentice: resumed from step %d", step)

  trainable, opt_state, frozen = mesh_lib.replicate((trainable, opt_state, frozen), mesh)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  train_step = jax.jit(pretrain.make_train_step(model, tx, config.seed), donate_argnums=(0, 1),
                       out_shardings=(replicated, replicated, replicated))
  examples = held_out_examples(config, workdir, ac.num_sample_subjects)
  writer = train_lib.MetricWriter(out / "logs")
  start_step, start_time = step, time.time()

  def save_samples(at_step, trainable):
    if not examples:
      return
    # Subjects with fewer images get masked demo slots: one compiled sampler for the grid.
    samples = [generate_lib.generate(model, trainable, frozen, e["demos"], e["prompt"],
                                     captions=e["captions"], num_images=1, seed=config.seed,
                                     check_memory=False, pad_demos_to=ac.num_inference_demos)[0]
               for e in examples]
    grid = train_lib.save_grid(out / "samples" / f"step_{at_step:06d}.png",
                               *grid_tiles(examples, samples))
    writer.image(at_step, "samples", grid)

  try:
    trainable, opt_state, step, last_loss = train_lib.fit(
        "apprentice", ac, train_step=train_step, trainable=trainable, opt_state=opt_state,
        frozen=frozen, data=data, mesh=mesh, ckpt=ckpt, writer=writer, step=step,
        save_samples=save_samples, config=config)
  finally:
    writer.close()

  seconds = time.time() - start_time
  summary = {"steps": step, "final_loss": last_loss, "params": count_params(trainable),
             "new_params": new_param_count(trainable),
             "images_per_second": round((step - start_step) * ac.batch_size / seconds, 2),
             "buffer_records_seen": data.get_state()["num_records"],
             "buffer_passes": data.get_state()["pass"], "devices": mesh.size,
             "checkpoint": str(checkpoint_dir(workdir)),
             "samples": str(out / "samples" / f"step_{step:06d}.png")}
  files.write_json(summary_path, summary)
  return summary


def plan_rows(config, ctx) -> list:
  """suti.plan rows: the apprentice's train step (apprentice.batch_size over the devices,
  num_train_demos demos each) and one guided sampling step with num_inference_demos demos
  (encoded once, outside the step, as generation does)."""
  from suti import diffusion  # pylint: disable=import-outside-toplevel
  from suti import plan  # pylint: disable=import-outside-toplevel  (plan imports stages lazily)
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  ac = config.apprentice
  base_model, _, _ = plan.abstract_model(config)
  model = Apprentice(config, text_encoder=base_model.text)
  trainable, frozen = model.abstract_init()
  tx = make_optimizer(ac, trainable)
  batch = ctx.per_device(ac.batch_size)
  n, te = ac.num_train_demos, config.model.text_encoder
  size = config.image_size
  sds = jax.ShapeDtypeStruct
  example = plan.abstract_batch(config, base_model, batch)
  if "tokens" in example:  # a frozen encoder: captions come pre-encoded, as the prompt does
    example["demo_tokens"] = sds((batch, n, te.max_length, te.width), jnp.float32)
  else:
    example["demo_ids"] = sds((batch, n, te.max_length), jnp.int32)
  example.update(demo_images=sds((batch, n, size, size, 3), jnp.float32),
                 demo_id_mask=sds((batch, n, te.max_length), jnp.bool_),
                 demo_mask=sds((batch, n), jnp.bool_))
  opt_state = jax.eval_shape(tx.init, trainable)
  scalar = sds((), jnp.int32)
  rows = [plan.Program("apprentice", "apprentice_train",
                       pretrain.make_train_step(model, tx, config.seed),
                       (trainable, opt_state, frozen, example, scalar),
                       params=count_params(trainable), batch_per_device=batch,
                       donate_argnums=(0, 1),
                       info={"optimizer": ac.optimizer, "global_batch": ac.batch_size,
                             "demos": n, "new_params": new_param_count(trainable)})]

  guidance = generate_lib.Guidance.from_config(config)
  branches, weights = guidance.branches()
  images = 1
  demos = ac.num_inference_demos
  tokens = lambda r: demos * (r * r + te.max_length)
  demo_tokens = {r: (sds((images, tokens(r), level_channels(config, r)), jnp.float32),
                     sds((images, tokens(r)), jnp.bool_)) for r in model.resolutions}
  cond = dict(plan.abstract_cond(config, images), demo=demo_tokens)
  schedule = diffusion.respace(model.schedule, 1)

  def sample_step(unet_params, conds, rng):
    return diffusion.sample(model.denoise_fn, unet_params, schedule, conds, rng,
                            (images, size, size, 3), weights=weights, sampler=ac.sampler,
                            steps=None, prediction=model.prediction,
                            percentile=config.diffusion.dynamic_threshold_percentile)

  rng = jax.eval_shape(lambda: jax.random.PRNGKey(0))
  rows.append(plan.Program(
      "apprentice", "apprentice_sample", sample_step,
      (trainable["unet"], tuple(cond for _ in branches), rng),
      params=count_params(trainable["unet"]), batch_per_device=images,
      info={"sampler": ac.sampler, "guidance_mode": guidance.mode, "demos": demos,
            "unet_batch": images * len(branches)}))
  return rows
