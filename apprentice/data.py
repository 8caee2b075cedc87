"""The apprentice's training stream: (y_s, p_s, C_s) examples from the experts' buffer.

The buffer may still be growing (the experts stage commits a round at a time). The stream
works in passes: each pass is a permutation of the records committed when it began; newly
committed rounds join at the next pass. Rounds only append, so the first n records never
change and the position {pass, index, num_records} fully determines what comes next: it is
saved in checkpoints, and a resumed stream yields the same batches as an uninterrupted one.
"""
from __future__ import annotations

import pathlib

import jax
import numpy as np

from experts import buffer as buffer_lib
from suti import train_lib
from suti.config_lib import InputError


class EmptyBufferError(InputError):
  """The buffer has too few admitted records to train on."""


def make_example(model, num_demos: int, text_dropout: float, demo_dropout: float,
                 image_size: int):
  """record, rng -> one example: target y_s, prompt p_s and num_demos demos drawn from C_s.

  Text and demos are dropped independently (the empty prompt; every demo masked), so the
  model learns the unconditional branches guidance needs. Subjects with fewer images than
  num_demos fill the rest with masked slots.
  """

  def transform(record, rng: np.random.Generator) -> dict:
    if record["image"].shape != (image_size, image_size, 3):
      raise InputError(f"buffer record of subject {record['subject_id']!r}: image "
                       f"{record['image'].shape}, the config's image_size is {image_size}")
    demos = np.asarray(record["demos"])
    chosen = rng.choice(len(demos), size=min(num_demos, len(demos)), replace=False)
    images = np.zeros((num_demos, image_size, image_size, 3), np.uint8)
    images[:len(chosen)] = demos[chosen]
    captions = [record["demo_captions"][i] for i in chosen] + [""] * (num_demos - len(chosen))
    keep = np.arange(num_demos) < len(chosen)
    prompt = record["prompt"]
    if rng.random() < text_dropout:
      prompt = ""
    if rng.random() < demo_dropout:
      keep = np.zeros_like(keep)
    tokens = model.tokenize([prompt])
    demo_tokens = model.tokenize(captions)
    return {"image": train_lib.to_model_space(record["image"]),
            "ids": tokens["ids"][0], "mask": tokens["mask"][0],
            "demo_images": train_lib.to_model_space(images),
            "demo_ids": demo_tokens["ids"], "demo_id_mask": demo_tokens["mask"],
            "demo_mask": keep}

  return transform


class BufferStream:
  """Batches (stacked dicts of numpy arrays) of `transform`ed buffer records, forever.

  Each process of a multi-host job takes its slice of every global batch. `threshold` None:
  the experts' admitted records; a float re-applies lambda over admitted and rejected ones.
  """

  def __init__(self, directory, *, batch_size: int, seed: int, transform,
               threshold: float | None = None):
    self.directory = pathlib.Path(directory)
    self.batch_size = batch_size
    self.seed = seed
    self.transform = transform
    self.threshold = threshold
    self.state = {"pass": 0, "index": 0, "num_records": 0}
    self._source = None
    self._order = None

  # ---------------------------------------------------------------------------- position
  def get_state(self) -> dict:
    return dict(self.state)

  def set_state(self, state: dict) -> None:
    if state is None:
      return
    if set(state) != {"pass", "index", "num_records"}:
      raise ValueError(f"not an apprentice data position: {state!r}")
    self.state = {k: int(v) for k, v in state.items()}
    self._source = self._order = None  # rebuilt for that pass on the next batch

  # ---------------------------------------------------------------------------- reading
  def available(self) -> int:
    """Records the buffer holds now."""
    return len(buffer_lib.BufferSource(self.directory, self.threshold))

  def _load(self):
    """The source and this pass's order, for the first state['num_records'] records."""
    source = buffer_lib.BufferSource(self.directory, self.threshold)
    n = self.state["num_records"]
    if len(source) < n:
      raise InputError(f"buffer {self.directory} has {len(source)} records but this run "
                       f"had already seen {n}: the buffer was replaced or truncated")
    rng = np.random.default_rng([self.seed, self.state["pass"], n])
    order = rng.permutation(n)
    if n < self.batch_size:  # a young buffer: repeat it to fill one batch per pass
      order = np.resize(order, self.batch_size)
    self._source, self._order = source, order

  def _next_pass(self):
    self.state = {"pass": self.state["pass"] + 1, "index": 0,
                  "num_records": self.available()}
    self._load()

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    if self.state["num_records"] == 0:  # the first pass: whatever is committed now
      self.state["num_records"] = self.available()
      if self.state["num_records"] == 0:
        raise EmptyBufferError(f"buffer {self.directory} has no records to train on")
    if self._order is None:
      self._load()
    start = self.state["index"]
    if start + self.batch_size > len(self._order):
      self._next_pass()
      start = 0
    positions = np.arange(start, start + self.batch_size)
    # Multi-host: this process's slice of the global batch.
    positions = positions[jax.process_index()::jax.process_count()]
    examples = []
    for pos in positions:
      record = self._source[int(self._order[pos])]
      rng = np.random.default_rng([self.seed, self.state["pass"], int(pos), 1])
      examples.append(self.transform(record, rng))
    self.state["index"] = start + self.batch_size
    return {k: np.stack([e[k] for e in examples]) for k in examples[0]}


def wait_for_records(directory, min_records: int, timeout_s: float, experts_done,
                     threshold: float | None = None, poll_s: float = 5.0) -> int:
  """Waits (up to timeout_s) until the buffer holds min_records; returns how many it holds.

  experts_done() says whether the experts stage has finished: then no more records will come
  and waiting is pointless.
  """
  try:
    return len(buffer_lib.wait_for(directory, min_records, timeout_s, poll_s, threshold,
                                   give_up=experts_done))
  except TimeoutError:
    count = len(buffer_lib.BufferSource(directory, threshold))
  state = "finished" if experts_done() else f"still running after {timeout_s:.0f}s"
  raise EmptyBufferError(
      f"buffer {directory} has {count} admitted records, the apprentice needs >= "
      f"{min_records} (experts stage {state}); run the experts stage, give it more subjects "
      f"or rounds, lower experts.delta_clip_threshold, or set apprentice.buffer_wait_s to "
      f"start beside a running experts stage")
