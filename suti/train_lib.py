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


def make_optimizer(name: str, learning_rate: float, warmup_steps: int = 0,
                   grad_clip: float = 1.0) -> optax.GradientTransformation:
  """Adam or Adafactor (SuTI: Adafactor for experts and apprentice) with linear warmup."""
  schedule = (optax.linear_schedule(0.0, learning_rate, warmup_steps) if warmup_steps
              else learning_rate)
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


def save_grid(path, images_uint8, columns: int, upscale: int = 2) -> np.ndarray:
  """Writes a PNG grid of uint8 images; returns the grid."""
  path = pathlib.Path(path)
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
