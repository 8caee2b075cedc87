"""In-context generation with a trained apprentice, and Dream-SuTI's subject fine-tuning.

    model, trainable, frozen = load(checkpoint_dir)              # no workdir needed
    images = generate(model, trainable, frozen, demos, "a ... in the snow", num_images=4)

`demos` are uint8 [H, W, 3] arrays or image files (any size: centre-cropped and resized).
The demos are encoded once per call (the DownStack pass of `Apprentice.encode_demos`); every
denoising step reuses those features. Guidance has one of three forms (config.apprentice):
  joint:       e(0,0) + w   [e(T,D) - e(0,0)]
  text_first:  e(0,0) + w_t [e(T,0) - e(0,0)] + w_d [e(T,D) - e(T,0)]
  image_first: e(0,0) + w_d [e(0,D) - e(0,0)] + w_t [e(T,D) - e(0,D)]
with T the prompt, D the demos and 0 their absence (the empty prompt; every demo masked).
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import os
import pathlib
from typing import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import PIL.Image

from apprentice.model import Apprentice, GUIDANCE_MODES
from suti import checkpoint as checkpoint_lib
from suti import diffusion
from suti import pretrain
from suti import train_lib
from suti.config_lib import InputError
from suti.data import images as images_lib

log = logging.getLogger("suti.generate")


class DemoMemoryError(InputError):
  """More demos than the demo attention can hold in this device's memory."""


@dataclasses.dataclass(frozen=True)
class Guidance:
  """How to guide: mode (GUIDANCE_MODES), the joint weight, and the separate text/demo ones."""
  mode: str = "joint"
  guidance: float = 15.0
  text_guidance: float = 7.5
  demo_guidance: float = 3.0

  @classmethod
  def from_config(cls, config, **overrides) -> Guidance:
    ac = config.apprentice
    kw = dict(mode=ac.guidance_mode, guidance=ac.guidance, text_guidance=ac.text_guidance,
              demo_guidance=ac.demo_guidance)
    kw.update({k: v for k, v in overrides.items() if v is not None})
    return cls(**kw)

  def branches(self) -> tuple[list[tuple[bool, bool]], list[float]]:
    """[(text?, demos?) per condition, c_0 first], and the weights of `guided_prediction`."""
    if self.mode not in GUIDANCE_MODES:
      raise InputError(f"guidance mode must be one of {GUIDANCE_MODES}, got {self.mode!r}")
    if self.mode == "joint":
      if self.guidance == 1.0:
        return [(True, True)], []
      return [(False, False), (True, True)], [self.guidance]
    if self.mode == "text_first":
      return ([(False, False), (True, False), (True, True)],
              [self.text_guidance, self.demo_guidance])
    return ([(False, False), (False, True), (True, True)],
            [self.demo_guidance, self.text_guidance])


# ------------------------------------------------------------------------------ inputs

def read_demos(demos: Sequence, size: int) -> np.ndarray:
  """Files or uint8 arrays of any size -> uint8 [N, size, size, 3] (centre crop, resize)."""
  out = []
  for i, demo in enumerate(demos):
    if isinstance(demo, (str, os.PathLike)):
      if not pathlib.Path(demo).is_file():
        raise InputError(f"demo image {demo}: no such file")
      try:
        out.append(images_lib.load_image(demo, size))
      except images_lib.UnreadableImageError as e:
        raise InputError(f"demo image {demo}: unreadable ({e})") from e
      continue
    array = np.asarray(demo)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[-1] != 3:
      raise InputError(f"demo {i}: expected a uint8 [H, W, 3] image, got {array.dtype} "
                       f"{array.shape}")
    if array.shape[:2] != (size, size):
      array = np.asarray(images_lib.center_crop_resize(PIL.Image.fromarray(array), size),
                         np.uint8)
    out.append(array)
  return np.stack(out) if out else np.zeros((0, size, size, 3), np.uint8)


def demo_batch(model: Apprentice, demos: np.ndarray, captions: Sequence[str] | None,
               pad_to: int = 0) -> dict:
  """uint8 [N, H, W, 3] and N captions (None: none) -> one example's demo inputs [1, N, ...].

  pad_to > N adds masked slots (blank image, no caption, demo_mask False) up to pad_to: the
  model ignores them, and every demo count up to pad_to shares one compiled sampler."""
  n = len(demos)
  captions = [""] * n if captions is None else [c or "" for c in captions]
  if len(captions) != n:
    raise InputError(f"{len(captions)} captions for {n} demos: give one per demo, or none")
  slots = max(n, pad_to)
  pad = lambda x: np.concatenate([x, np.zeros((slots - n, *x.shape[1:]), x.dtype)])[None]
  tokens = model.tokenize(captions) if n else {
      k: np.zeros((0, model.text.max_length), d) for k, d in (("ids", np.int32), ("mask", bool))}
  return {"demo_images": train_lib.to_model_space(pad(demos)),
          "demo_ids": pad(tokens["ids"]), "demo_id_mask": pad(tokens["mask"]),
          "demo_mask": (np.arange(slots) < n)[None]}


def available_memory_bytes(device=None) -> int:
  """Free memory of the device samples run on (host RAM for CPU)."""
  device = device or jax.devices()[0]
  stats = device.memory_stats() if device.platform != "cpu" else None
  if stats and "bytes_limit" in stats:
    return int(stats["bytes_limit"] - stats.get("bytes_in_use", 0))
  return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def demo_attention_bytes(model: Apprentice, num_demos: int, batch: int) -> dict[int, int]:
  """Bytes of the largest demo-attention intermediate (float32 logits and weights) per size r,
  for `batch` images (guidance branches included) attending to num_demos demos."""
  length = model.text.max_length
  heads = model.unet.demo_heads
  out = {}
  for r in model.resolutions:
    keys = num_demos * (r * r + length)
    out[r] = 2 * 4 * batch * heads * r * r * keys
  return out


def check_demo_memory(model: Apprentice, num_demos: int, batch: int, available: int | None = None,
                      fraction: float = 0.5) -> None:
  """DemoMemoryError, naming the numbers, when the demo attention would not fit."""
  available = available_memory_bytes() if available is None else available
  need = demo_attention_bytes(model, num_demos, batch)
  worst = max(need, key=need.get) if need else None
  if worst is not None and need[worst] > fraction * available:
    per_demo = need[worst] / max(num_demos, 1)
    fits = int(fraction * available // per_demo)
    raise DemoMemoryError(
        f"{num_demos} demos do not fit in memory: the demo attention at {worst}x{worst} needs "
        f"~{need[worst] / 2**30:.2f} GiB for {batch} images (guidance branches included), "
        f"over half of the {available / 2**30:.2f} GiB free; use at most {fits} demos or fewer "
        f"images per call")


# ------------------------------------------------------------------------------ sampling

def conditions(model: Apprentice, trainable, frozen, prompt: str, demos: dict, num_images: int,
               guidance: Guidance, *, cache: bool = True) -> tuple[list[dict], list[float]]:
  """The guidance branches' conditions for `num_images` images of one prompt and demo set.

  cache=True: demo features computed here, once ({'demo': ...}); False: the raw demos ride in
  each condition and `model.denoise_uncached_fn` re-encodes them at every step.
  """
  branches, weights = guidance.branches()
  text = model._encode_text_jit(trainable, frozen, model.tokenize([prompt] * num_images))
  null = model._encode_text_jit(trainable, frozen, model.null_tokens(num_images))
  repeat = lambda x: jnp.repeat(jnp.asarray(x), num_images, axis=0)
  n = demos["demo_images"].shape[1]
  if n:
    captions = model._encode_text_jit(trainable, frozen, {"ids": demos["demo_ids"],
                                                           "mask": demos["demo_id_mask"]})
  if cache:
    with_demos = (model._encode_demos_jit(trainable, jnp.asarray(demos["demo_images"]), captions,
                                          jnp.asarray(demos["demo_mask"]))
                  if n else model.no_demos(1))
    with_demos = jax.tree.map(repeat, with_demos)
    without = {r: (tokens, jnp.zeros_like(mask)) for r, (tokens, mask) in with_demos.items()}
  elif not n:
    raise ValueError("cache=False needs at least one demo")
  conds = []
  for use_text, use_demos in branches:
    cond = dict(text if use_text else null)
    if cache:
      cond["demo"] = with_demos if use_demos else without
    else:
      mask = repeat(demos["demo_mask"])
      cond.update(demo_images=repeat(demos["demo_images"]),
                  demo_captions=jax.tree.map(repeat, captions),
                  demo_mask=mask if use_demos else jnp.zeros_like(mask))
    conds.append(cond)
  return conds, weights


def generate(model: Apprentice, trainable, frozen, demos: Sequence, prompt: str, *,
             captions: Sequence[str] | None = None, num_images: int = 4, seed: int = 0,
             sampler: str | None = None, steps: int | None = None,
             guidance: Guidance | None = None, cache: bool = True,
             check_memory: bool = True, pad_demos_to: int = 0) -> np.ndarray:
  """uint8 [num_images, H, W, 3]: the demos' subject as `prompt` describes. Deterministic
  for a seed. sampler/steps default to config.apprentice's (DDPM, as the paper).
  pad_demos_to: see `demo_batch` (the same images, one compile for fewer demos)."""
  ac = model.config.apprentice
  if not isinstance(prompt, str):
    raise InputError(f"prompt must be a string, got {type(prompt).__name__}")
  if num_images < 1:
    raise InputError(f"num_images must be >= 1, got {num_images}")
  guidance = guidance or Guidance.from_config(model.config)
  images = read_demos(demos, model.image_size)
  batch = demo_batch(model, images, captions, pad_to=pad_demos_to)
  branches, _ = guidance.branches()
  if check_memory:
    check_demo_memory(model, batch["demo_mask"].shape[1], num_images * len(branches))
  conds, weights = conditions(model, trainable, frozen, prompt, batch, num_images, guidance,
                              cache=cache)
  denoise, params = ((model.denoise_fn, trainable["unet"]) if cache
                     else (model.denoise_uncached_fn, trainable))
  size = model.image_size
  samples = diffusion.sample(
      denoise, params, model.schedule, conds, jax.random.PRNGKey(seed),
      (num_images, size, size, 3), weights=weights, sampler=sampler or ac.sampler,
      steps=steps or ac.sample_steps, prediction=model.prediction,
      percentile=model.config.diffusion.dynamic_threshold_percentile)
  return train_lib.to_uint8(samples)


# ------------------------------------------------------------------------------ Dream-SuTI

@functools.lru_cache(maxsize=4)
def _finetune_functions(model: Apprentice, learning_rate: float):
  """(tx, jitted step(params, opt_state, frozen, batch, seed, step)). The seed is an argument,
  not a constant of the program: evaluate fine-tunes every subject with its own seed, and a
  compile per subject cost more than the fine-tuning itself."""
  tx = train_lib.make_optimizer("adafactor", learning_rate)

  def step_fn(params, opt_state, frozen, batch, seed, step):
    return pretrain.make_train_step(model, tx, seed)(params, opt_state, frozen, batch, step)

  return tx, jax.jit(step_fn, donate_argnums=(1,))


def finetune_batches(images: np.ndarray, captions: Sequence[str] | None, batch_size: int,
                     step: int, seed: int, model: Apprentice) -> dict:
  """Dream-SuTI examples: one of the subject's images is the target, another the one demo."""
  n = len(images)
  rng = np.random.default_rng([seed, step])
  targets = rng.integers(0, n, batch_size)
  demos = (targets + rng.integers(1, n, batch_size)) % n  # any image but the target
  captions = [""] * n if captions is None else [c or "" for c in captions]
  prompt = model.tokenize([captions[i] for i in targets])
  demo_tokens = model.tokenize([captions[i] for i in demos])
  space = train_lib.to_model_space(images)
  return {"image": space[targets], "ids": prompt["ids"], "mask": prompt["mask"],
          "demo_images": space[demos][:, None], "demo_ids": demo_tokens["ids"][:, None],
          "demo_id_mask": demo_tokens["mask"][:, None],
          "demo_mask": np.ones((batch_size, 1), bool)}


def finetune(model: Apprentice, trainable, frozen, demos: Sequence, *,
             captions: Sequence[str] | None = None, num_steps: int | None = None,
             learning_rate: float | None = None, batch_size: int | None = None, seed: int = 0,
             callback=None):
  """Dream-SuTI: the apprentice fine-tuned on one subject's own images (paper: 500 steps).
  Returns (new trainable params, last loss). The caller's params are left unchanged."""
  ac = model.config.apprentice
  num_steps = ac.finetune_steps if num_steps is None else num_steps
  images = read_demos(demos, model.image_size)
  if len(images) < 2:
    raise InputError(f"Dream-SuTI fine-tuning needs >= 2 images of the subject (one as the "
                     f"demo, another as the target), got {len(images)}")
  tx, step_fn = _finetune_functions(model, float(learning_rate or ac.finetune_learning_rate))
  # Params (a copy: the step donates them) and optimizer state committed to one device, as
  # the step's outputs are: restored params are committed and tx.init's zeros are not, and
  # that difference recompiled the step at step 1 (a second ~60 s compile in tiny's evaluate).
  device = jax.tree.leaves(trainable)[0].sharding
  params = jax.device_put(jax.tree.map(jnp.array, trainable), device)
  opt_state = jax.device_put(tx.init(params), device)
  loss = float("nan")
  for step in range(num_steps):
    batch = finetune_batches(images, captions, batch_size or ac.finetune_batch_size, step, seed,
                             model)
    params, opt_state, metrics = step_fn(params, opt_state, frozen, batch, jnp.int32(seed),
                                         jnp.int32(step))
    if callback is not None:
      callback(step, metrics)
    loss = metrics["loss"]
  return params, float(loss)


# ------------------------------------------------------------------------------ loading

def read_config(directory, step: int | None = None) -> ml_collections.ConfigDict:
  """The config an apprentice checkpoint was trained with (saved beside its params)."""
  with checkpoint_lib.Checkpoints(directory, read_only=True) as ckpt:
    config = ckpt.read_config(step)
  if config is None:
    raise InputError(f"checkpoint {directory} has no config; it was not written by the "
                     f"apprentice or export stage")
  return ml_collections.ConfigDict(config)


def load(directory, step: int | None = None, config=None):
  """(model, trainable, frozen) from an apprentice checkpoint directory (the apprentice stage's
  checkpoints/ or an export), rebuilt from the config saved with it."""
  directory = pathlib.Path(directory)
  if not directory.is_dir():
    raise InputError(f"checkpoint {directory}: no such directory")
  config = config or read_config(directory, step)
  te = config.model.text_encoder
  if te.kind != "world" and te.path and not pathlib.Path(te.path).is_absolute():
    # An export carries its frozen text encoder beside the checkpoint (apprentice.export).
    if (directory.parent / te.path).is_dir():
      te.path = str(directory.parent / te.path)
  model = Apprentice(config)
  template, _ = model.abstract_init()
  with checkpoint_lib.Checkpoints(directory, read_only=True) as ckpt:
    restored = ckpt.restore(params=template, step=step)
  if restored is None:
    raise InputError(f"checkpoint {directory}: no checkpoint steps in it")
  return model, restored.params, model.frozen_params()
