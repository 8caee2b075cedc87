"""Pieces every training stage shares: optimizers, metric writers, sample grids, progress."""
from __future__ import annotations

import json
import pathlib
import time

import jax
import numpy as np
import optax
import tqdm

from suti.data import images as images_lib


def decay_steps(section) -> int:
  """make_optimizer's decay_steps for a config section with lr_schedule and num_steps: the
  run's length for 'cosine', 0 (no decay) for 'constant'."""
  return section.num_steps if section.lr_schedule == "cosine" else 0


def make_optimizer(name: str, learning_rate: float, warmup_steps: int = 0,
                   grad_clip: float = 1.0, decay_steps: int = 0) -> optax.GradientTransformation:
  """Adam or Adafactor (SuTI: Adafactor for experts and apprentice) with linear warmup; with
  decay_steps (the run's length) the rate then falls as a cosine to zero at that step."""
  if decay_steps:
    schedule = optax.warmup_cosine_decay_schedule(0.0, learning_rate, warmup_steps,
                                                  max(decay_steps, warmup_steps + 1))
  elif warmup_steps:
    schedule = optax.linear_schedule(0.0, learning_rate, warmup_steps)
  else:
    schedule = learning_rate
  if name == "adam":
    inner = optax.adam(schedule)
  elif name == "adafactor":
    # Factored second moments: optimizer state of O(rows + cols) per matrix, which is what
    # lets a 2B-parameter expert train on one 32 GiB TPU core.
    inner = optax.adafactor(schedule, multiply_by_parameter_scale=False,
                            clipping_threshold=None)
  else:
    raise ValueError(f"optimizer must be adam or adafactor, got {name!r}")
  return optax.chain(optax.clip_by_global_norm(grad_clip), inner)


class MetricWriter:
  """TensorBoard scalars and images plus a metrics.jsonl that tests and reports can read."""

  def __init__(self, logdir, enabled: bool = True):
    self.logdir = pathlib.Path(logdir)
    self.enabled = enabled and jax.process_index() == 0  # one writer per job
    self._tb = None
    if self.enabled:
      self.logdir.mkdir(parents=True, exist_ok=True)
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(str(self.logdir))
      self._jsonl = open(self.logdir / "metrics.jsonl", "a", encoding="utf-8")

  def scalars(self, step: int, values: dict) -> None:
    if not self.enabled:
      return
    clean = {k: float(v) for k, v in values.items()}
    for key, value in clean.items():
      self._tb.add_scalar(key, value, step)
    self._jsonl.write(json.dumps({"step": int(step), **clean}) + "\n")
    self._jsonl.flush()

  def histogram(self, step: int, name: str, values) -> None:
    if self.enabled:
      self._tb.add_histogram(name, np.asarray(values), step)

  def image(self, step: int, name: str, image: np.ndarray) -> None:
    """uint8 [H, W, 3] to TensorBoard."""
    if self.enabled:
      self._tb.add_image(name, np.asarray(image), step, dataformats="HWC")

  def close(self) -> None:
    if self.enabled:
      self._tb.close()
      self._jsonl.close()


def read_metrics(logdir) -> list[dict]:
  path = pathlib.Path(logdir) / "metrics.jsonl"
  if not path.exists():
    return []
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def to_uint8(images) -> np.ndarray:
  """Model space [-1, 1] float -> uint8 [0, 255]."""
  images = np.asarray(images, np.float32)
  return np.clip(np.round((images + 1.0) * 127.5), 0, 255).astype(np.uint8)


def to_model_space(images) -> np.ndarray:
  """uint8 [0, 255] -> float32 [-1, 1]."""
  return np.asarray(images, np.float32) / 127.5 - 1.0


def save_grid(path, images_uint8, columns: int, upscale: int | None = None) -> np.ndarray:
  """Writes a PNG grid of uint8 images; returns the grid. Tiles are upscaled (nearest) to at
  least 64 px unless `upscale` is given, so 16x16 samples stay readable."""
  path = pathlib.Path(path)
  if upscale is None:
    upscale = max(1, -(-64 // np.asarray(images_uint8).shape[1]))
  path.parent.mkdir(parents=True, exist_ok=True)
  grid = images_lib.image_grid(images_uint8, columns, upscale=upscale)
  tmp = path.with_name(path.stem + ".tmp.png")
  images_lib.save_png(grid, tmp)
  tmp.replace(path)
  return grid


class Throughput:
  """Examples per second over the steps since the last call."""

  def __init__(self):
    self._time, self._count = time.perf_counter(), 0

  def add(self, count: int) -> None:
    self._count += count

  def rate(self) -> float:
    now = time.perf_counter()
    rate = self._count / max(now - self._time, 1e-9)
    self._time, self._count = now, 0
    return rate


def progress(total: int, initial: int, desc: str):
  """A tqdm bar that only the first process shows."""
  return tqdm.tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True,
                   disable=jax.process_index() != 0, mininterval=1.0)


def fit(name: str, section, *, train_step, trainable, opt_state, frozen, data, mesh, ckpt,
        writer, step: int, save_samples, config):
  """The data-parallel loop pretrain and the apprentice share, from `step` to
  section.num_steps; `section` (config.pretrain, config.apprentice) also gives batch_size,
  log_every, checkpoint_every and sample_every.

  train_step(trainable, opt_state, frozen, batch, step) -> (trainable, opt_state, metrics)
  is jitted by the caller; `data` is an iterator with get_state() (saved in checkpoints).
  Logs scalars every log_every steps (a non-finite loss stops training, naming the last good
  checkpoint), checkpoints every checkpoint_every and at the end, and calls
  save_samples(step, trainable) every sample_every and at the end.
  Returns (trainable, opt_state, step, last loss).
  """
  from suti import mesh as mesh_lib  # pylint: disable=import-outside-toplevel

  num_steps, batch_size = section.num_steps, section.batch_size
  log_every, checkpoint_every = section.log_every, section.checkpoint_every
  sample_every = section.sample_every
  block = mesh_lib.needs_blocking(mesh)
  throughput = Throughput()
  last_loss = float("nan")
  bar = progress(num_steps, step, name)
  try:
    while step < num_steps:
      batch = mesh_lib.shard_batch(next(data), mesh, "data")
      trainable, opt_state, metrics = train_step(trainable, opt_state, frozen, batch,
                                                 np.int32(step))
      if block:  # CPU with several devices: see mesh.needs_blocking
        jax.block_until_ready(metrics)
      step += 1
      throughput.add(batch_size)
      if step % log_every == 0 or step == num_steps:
        metrics = jax.device_get(metrics)
        last_loss = float(metrics["loss"])
        if not np.isfinite(last_loss):
          raise FloatingPointError(f"{name}: loss is {last_loss} at step {step}; the last "
                                   f"checkpoint (step {ckpt.latest_step()}) is intact")
        rate = throughput.rate()
        writer.scalars(step, {"loss": last_loss, "grad_norm": metrics["grad_norm"],
                              "images_per_second": rate})
        bar.set_postfix(loss=f"{last_loss:.4f}", img_s=f"{rate:.1f}")
      bar.update(1)
      if step % checkpoint_every == 0 or step == num_steps:
        ckpt.save(step, params=trainable, opt_state=opt_state, config=config,
                  data_state=data.get_state(), meta={"stage": name})
      if step % sample_every == 0 or step == num_steps:
        save_samples(step, trainable)
  finally:
    bar.close()
    ckpt.wait()
  return trainable, opt_state, step, last_loss
