"""CLIP scoring: CLIP-T (image, prompt), CLIP-I (image, image) and SuTI's delta-CLIP filter.

One loading path for every CLIP: a Hugging Face directory (config.json, flax_model.msgpack or a
PyTorch-format model.safetensors, tokenizer files), whether it holds a real OpenAI CLIP or the
small world CLIP that stage `clip` trains (suti.clip_train); a hub name works when online.

  scorer = ClipScorer.from_pretrained("workdir/demo/clip")
  img = scorer.embed_images(images_uint8)            # [N, D], unit norm
  txt = scorer.embed_texts(["a star on the grass"])  # [N, D], unit norm
  scorer.score(images_uint8, prompts)                # [N] cosine of pairs (CLIP-T)
  scorer.delta(targets, demos_list, prompts)         # SuTI's delta-CLIP, see `delta_clip`

SuTI keeps an expert's sample y for prompt p and demos C only if
  delta(y, C, p) = CLIP(y, p) - max_{x in C} CLIP(x, p) > lambda   (paper: lambda = 0.02),
on raw cosines (not the x100 CLIP score).
"""
from __future__ import annotations

import json
import os
import pathlib
import types
from typing import Sequence

from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from suti import hf_dir

# OpenAI CLIP's pixel statistics: used when a directory has no preprocessor_config.json.
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

_SAFETENSORS = "model.safetensors"
_TOKENIZER_FILES = (("tokenizer.json",), ("vocab.json", "merges.txt"))


# ---------------------------------------------------------------------------------------------
# Pure functions (jittable; also used by clip_train so training and scoring see the same pixels).


def preprocess(images, image_size: int, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD):
  """[B, H, W, 3] pixels in [0, 255] (any dtype) -> normalized float32 [B, 3, S, S].

  As CLIPImageProcessor: resize the short side to the model's size (bicubic, antialiased),
  centre crop, clip to the pixel range (bicubic overshoots), scale to [0, 1], normalize. FlaxCLIP
  takes NCHW and transposes back itself.
  """
  x = jnp.asarray(images, jnp.float32)
  h, w = x.shape[1:3]
  if (h, w) != (image_size, image_size):
    # The processor's sizes: short side = S, long side = int(S * long / short).
    scale = image_size / min(h, w)
    new_h = image_size if h <= w else int(h * scale)
    new_w = image_size if w < h else int(w * scale)
    if (new_h, new_w) != (h, w):
      x = jax.image.resize(x, (x.shape[0], new_h, new_w, 3), "bicubic", antialias=True)
      x = jnp.clip(x, 0.0, 255.0)
    top, left = (new_h - image_size) // 2, (new_w - image_size) // 2
    x = x[:, top:top + image_size, left:left + image_size]
  x = (x / 255.0 - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)
  return jnp.transpose(x, (0, 3, 1, 2))


def l2_normalize(x, axis=-1):
  return x / jnp.maximum(jnp.linalg.norm(x, axis=axis, keepdims=True), 1e-12)


@jax.jit
def _delta_clip(target_emb, demo_emb, text_emb, demo_mask):
  target_emb, demo_emb, text_emb = map(l2_normalize, (target_emb, demo_emb, text_emb))
  clip_target = jnp.einsum("nd,nd->n", target_emb, text_emb)
  clip_demos = jnp.einsum("nkd,nd->nk", demo_emb, text_emb)
  clip_demos_max = jnp.max(jnp.where(demo_mask, clip_demos, -jnp.inf), axis=-1)
  return {"delta": clip_target - clip_demos_max, "clip_target": clip_target,
          "clip_demos_max": clip_demos_max}


def delta_clip(target_emb, demo_emb, text_emb, demo_mask=None) -> dict:
  """SuTI's delta-CLIP for N (y, C, p) triples at once, from embeddings.

  Args:
    target_emb: [N, D] image embeddings of the candidates y.
    demo_emb: [N, K, D] image embeddings of each candidate's demonstrations C, padded to K.
    text_emb: [N, D] text embeddings of the prompts p.
    demo_mask: [N, K] bool, True on real demos; None: all K are real.
  Returns:
    {'delta': [N], 'clip_target': [N], 'clip_demos_max': [N]}: cosines (embeddings are
    re-normalized, so any scale works). A row without any real demo has clip_demos_max = -inf
    and delta = +inf: nothing to be compared against, so nothing vetoes it.
  """
  target_emb, demo_emb, text_emb = (jnp.asarray(x, jnp.float32)
                                    for x in (target_emb, demo_emb, text_emb))
  if target_emb.ndim != 2 or text_emb.shape != target_emb.shape:
    raise ValueError(f"target_emb and text_emb must both be [N, D]; got {target_emb.shape} and "
                     f"{text_emb.shape}")
  n, d = target_emb.shape
  if demo_emb.ndim != 3 or demo_emb.shape[0] != n or demo_emb.shape[2] != d:
    raise ValueError(f"demo_emb must be [N, K, D] = [{n}, K, {d}], got {demo_emb.shape}")
  if demo_mask is None:
    demo_mask = jnp.ones(demo_emb.shape[:2], bool)
  demo_mask = jnp.asarray(demo_mask)
  if demo_mask.shape != demo_emb.shape[:2] or demo_mask.dtype != jnp.bool_:
    raise ValueError(f"demo_mask must be bool [N, K] = {list(demo_emb.shape[:2])}, got "
                     f"{demo_mask.dtype} {list(demo_mask.shape)}")
  return _delta_clip(target_emb, demo_emb, text_emb, demo_mask)


# ---------------------------------------------------------------------------------------------
# Loading a Hugging Face directory.


def _is_local(path) -> bool:
  """A path the user means as a local directory (vs. a hub name like 'openai/clip-vit-b-32')."""
  if isinstance(path, pathlib.Path) or os.path.exists(path):
    return True
  path = str(path)
  if os.path.isabs(path) or path.startswith((".", "~")) or path.count("/") > 1:
    return True
  parent = os.path.dirname(path)
  return bool(parent) and os.path.isdir(parent)  # 'workdir/clip' when workdir/ exists


def check_clip_dir(path) -> str:
  """Raises FileNotFoundError naming the directory and the missing file; returns the weights."""
  path = str(path)
  weights = hf_dir.check_model_dir(path, "CLIP")
  has = lambda name: hf_dir.has_file(path, name)
  if not any(all(map(has, files)) for files in _TOKENIZER_FILES):
    wanted = " or ".join(" + ".join(files) for files in _TOKENIZER_FILES)
    missing = [f for f in _TOKENIZER_FILES[1] if not has(f)]
    raise FileNotFoundError(f"CLIP directory {path!r} has no tokenizer files: expected "
                            f"{wanted} (missing {', '.join(missing)})")
  return weights


def _load_pytorch_safetensors(model, filename):
  """model.safetensors in PyTorch layout -> Flax params, without torch.

  transformers' own from_pt path needs a randomly initialized model (seconds to minutes for a
  ViT-L); its renaming helper only needs the parameter shapes, so it gets the shape tree.
  """
  # pylint: disable=import-outside-toplevel
  from safetensors import safe_open
  from transformers import modeling_flax_pytorch_utils as pt_utils
  state = {}
  with safe_open(filename, framework="flax") as f:  # jax arrays: bfloat16 / float16 read too
    for key in f.keys():
      state[key] = np.asarray(f.get_tensor(key), np.float32)
  shapes = model.params_shape_tree
  shim = types.SimpleNamespace(params=shapes, base_model_prefix=model.base_model_prefix)
  converted = traverse_util.flatten_dict(pt_utils.convert_pytorch_state_dict_to_flax(state, shim))
  wanted = traverse_util.flatten_dict(shapes)
  missing = sorted("/".join(k) for k in set(wanted) - set(converted))
  if missing:
    raise ValueError(f"{filename} lacks CLIP weights: {missing[:5]}"
                     f"{' ...' if len(missing) > 5 else ''}")
  # Buffers such as text_model.embeddings.position_ids have no Flax counterpart: dropped.
  return traverse_util.unflatten_dict({k: np.asarray(converted[k]) for k in wanted})


def _load_model(path, weights):
  import transformers  # pylint: disable=import-outside-toplevel
  filename = os.path.join(path, weights)
  if weights == _SAFETENSORS:
    from safetensors import safe_open  # pylint: disable=import-outside-toplevel
    with safe_open(filename, framework="flax") as f:
      fmt = (f.metadata() or {}).get("format", "pt")
    if fmt == "pt":
      config = transformers.CLIPConfig.from_pretrained(path)
      model = transformers.FlaxCLIPModel(config, _do_init=False)
      return model, _load_pytorch_safetensors(model, filename)
  # _do_init=False: no random init of weights that are about to be replaced.
  return transformers.FlaxCLIPModel.from_pretrained(path, _do_init=False)


def _pixel_stats(path) -> tuple[tuple, tuple]:
  config = os.path.join(path, "preprocessor_config.json")
  if os.path.isfile(config):
    with open(config, encoding="utf-8") as f:
      stats = json.load(f)
    return (tuple(stats.get("image_mean", OPENAI_CLIP_MEAN)),
            tuple(stats.get("image_std", OPENAI_CLIP_STD)))
  return OPENAI_CLIP_MEAN, OPENAI_CLIP_STD


# ---------------------------------------------------------------------------------------------
# The scorer.


class ClipScorer:
  """A frozen CLIP with its tokenizer and preprocessing; every output is numpy.

  Images are uint8 [N, H, W, 3] RGB of any size (resized to the model's). Images a diffusion
  model produced, float in [-1, 1], are taken with `model_space=True` instead of being
  converted by the caller: an explicit flag, so a float array in [0, 255] or [0, 1] passed by
  mistake is an error rather than a silently wrong score.

  Embeddings run jitted in fixed batches of `batch_size` (the last one padded), so any N
  compiles once per image size.
  """

  def __init__(self, model, params, tokenizer, *, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD,
               batch_size: int = 32, name: str = ""):
    if batch_size < 1:
      raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    self.model, self.params, self.tokenizer = model, params, tokenizer
    self.mean, self.std = tuple(mean), tuple(std)
    self.batch_size, self.name = batch_size, name
    config = model.config
    self.image_size = config.vision_config.image_size
    self.embed_dim = config.projection_dim
    self.max_length = min(config.text_config.max_position_embeddings,
                          getattr(tokenizer, "model_max_length", 10**9))
    # Params are arguments, not closed-over constants: a ViT-L's weights stay out of the HLO.
    self._image_fn = jax.jit(lambda p, x: l2_normalize(model.get_image_features(
        preprocess(x, self.image_size, self.mean, self.std), params=p)))
    self._text_fn = jax.jit(lambda p, ids, mask: l2_normalize(model.get_text_features(
        ids, attention_mask=mask, params=p)))

  @classmethod
  def from_pretrained(cls, path_or_name, *, batch_size: int = 32) -> ClipScorer:
    """A local Hugging Face CLIP directory, or a hub name when online."""
    import transformers  # pylint: disable=import-outside-toplevel
    name = str(path_or_name)
    if not _is_local(path_or_name):
      try:
        model = transformers.FlaxCLIPModel.from_pretrained(name)
        tokenizer = transformers.AutoTokenizer.from_pretrained(name)
      except OSError as e:
        raise FileNotFoundError(f"CLIP {name!r} is not a local directory and could not be "
                                f"loaded from the Hugging Face hub: {e}") from e
      try:
        processor = transformers.CLIPImageProcessor.from_pretrained(name)
        mean, std = processor.image_mean, processor.image_std
      except OSError:
        mean, std = OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
      return cls(model, model.params, tokenizer, mean=mean, std=std, batch_size=batch_size,
                 name=name)
    path = os.path.expanduser(name)
    weights = check_clip_dir(path)
    model, params = _load_model(path, weights)
    try:
      tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    except Exception as e:  # pylint: disable=broad-except
      raise OSError(f"could not load the CLIP tokenizer from {path!r}: {e}") from e
    mean, std = _pixel_stats(path)
    params = jax.tree_util.tree_map(jnp.asarray, params)
    return cls(model, params, tokenizer, mean=mean, std=std, batch_size=batch_size, name=path)

  # --- inputs ----------------------------------------------------------------------------------

  def _check_images(self, images, model_space: bool, what: str = "images") -> np.ndarray:
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f"{what} must be [N, H, W, 3] RGB, got shape {images.shape}")
    if model_space:
      if not np.issubdtype(images.dtype, np.floating):
        raise TypeError(f"{what}: model_space=True expects float images in [-1, 1], got "
                        f"{images.dtype}")
      if images.size and (images.min() < -1.01 or images.max() > 1.01):
        raise ValueError(f"{what}: model_space=True expects values in [-1, 1], got "
                         f"[{images.min():.3g}, {images.max():.3g}]")
      return (np.clip(images, -1.0, 1.0).astype(np.float32) + 1.0) * 127.5
    if images.dtype != np.uint8:
      raise TypeError(f"{what} must be uint8 in [0, 255], got {images.dtype} (float images "
                      f"in [-1, 1] from a diffusion model: pass model_space=True)")
    return images

  def _check_prompts(self, prompts) -> list[str]:
    if isinstance(prompts, str):
      raise TypeError("prompts must be a list of strings, got one string")
    prompts = list(prompts)
    for i, p in enumerate(prompts):
      if not isinstance(p, str):
        raise TypeError(f"prompts[{i}] must be a string, got {type(p).__name__}")
      if not p.strip():
        raise ValueError(f"prompts[{i}] is empty: CLIP needs text to score against")
    return prompts

  def tokenize(self, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """int32 ids and attention mask [N, max_length] (truncated; EOT kept)."""
    prompts = self._check_prompts(prompts)
    out = self.tokenizer(prompts, padding="max_length", truncation=True,
                         max_length=self.max_length, return_tensors="np")
    return out["input_ids"].astype(np.int32), out["attention_mask"].astype(np.int32)

  # --- embeddings ------------------------------------------------------------------------------

  def _batched(self, fn, arrays, n):
    out = np.zeros((n, self.embed_dim), np.float32)
    b = self.batch_size
    for start in range(0, n, b):
      chunk = [a[start:start + b] for a in arrays]
      real = len(chunk[0])
      if real < b:  # pad with copies of the first row: same shapes, no recompile
        chunk = [np.concatenate([c, np.repeat(c[:1], b - real, 0)]) for c in chunk]
      out[start:start + real] = np.asarray(fn(self.params, *chunk))[:real]
    return out

  def embed_images(self, images, *, model_space: bool = False) -> np.ndarray:
    """uint8 [N, H, W, 3] (or float [-1, 1] with model_space=True) -> unit [N, D]."""
    return self._embed_pixels(self._check_images(images, model_space))

  def _embed_pixels(self, pixels) -> np.ndarray:
    """Checked pixels in [0, 255] (uint8, or float32 from model space) -> unit [N, D]."""
    return self._batched(self._image_fn, [pixels], len(pixels))

  def embed_texts(self, prompts: Sequence[str]) -> np.ndarray:
    """N prompts -> unit [N, D]."""
    ids, mask = self.tokenize(prompts)
    return self._batched(self._text_fn, [ids, mask], len(ids))

  # --- scores ----------------------------------------------------------------------------------

  def score(self, images, prompts: Sequence[str], *, model_space: bool = False) -> np.ndarray:
    """CLIP-T: cosine of each (image, prompt) pair, [N] (raw cosine, not x100)."""
    prompts = self._check_prompts(prompts)
    images = self._check_images(images, model_space)
    if len(images) != len(prompts):
      raise ValueError(f"score needs one prompt per image: {len(images)} images, "
                       f"{len(prompts)} prompts")
    return np.sum(self._embed_pixels(images) * self.embed_texts(prompts), axis=-1)

  def delta(self, targets, demos_list, prompts: Sequence[str], *,
            model_space: bool = False) -> dict:
    """delta_clip for N candidates: targets [N, H, W, 3], demos_list N arrays [K_i, H, W, 3].

    Returns numpy {'delta', 'clip_target', 'clip_demos_max'}, each [N].
    """
    prompts = self._check_prompts(prompts)
    targets = self._check_images(targets, model_space, "targets")
    demos_list = [self._check_images(d, model_space, f"demos_list[{i}]")
                  for i, d in enumerate(demos_list)]
    if not len(targets) == len(demos_list) == len(prompts):
      raise ValueError(f"delta needs one demo set and prompt per target: {len(targets)} "
                       f"targets, {len(demos_list)} demo sets, {len(prompts)} prompts")
    for i, d in enumerate(demos_list):
      if not len(d):
        raise ValueError(f"demos_list[{i}] is empty: SuTI compares against >= 1 demo")
    if not len(targets):
      return {key: np.zeros(0, np.float32) for key in ("delta", "clip_target", "clip_demos_max")}
    counts = [len(d) for d in demos_list]
    if len({d.shape[1:] for d in demos_list}) == 1:  # one batched pass over every demo
      flat = np.split(self._embed_pixels(np.concatenate(demos_list)), np.cumsum(counts)[:-1])
    else:
      flat = [self._embed_pixels(d) for d in demos_list]
    k = max(counts)
    demo_emb = np.zeros((len(targets), k, self.embed_dim), np.float32)
    mask = np.zeros((len(targets), k), bool)
    for i, e in enumerate(flat):
      demo_emb[i, :len(e)], mask[i, :len(e)] = e, True
    out = delta_clip(self._embed_pixels(targets), demo_emb, self.embed_texts(prompts), mask)
    return {key: np.asarray(v) for key, v in out.items()}
