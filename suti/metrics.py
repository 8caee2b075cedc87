"""DreamBench metrics (CLIP-T, CLIP-I, DINO) and JeDi's masked MCLIP-I / MDINO.

  CLIP-T   mean cosine(CLIP image embedding of a generated image, CLIP text embedding of its
           prompt): does the image follow the prompt?
  CLIP-I   mean over generated images of the average cosine between the image and each real
           image of the subject (CLIP image embeddings): does it look like the subject?
  DINO     CLIP-I with a DINO ViT's CLS embedding, which (unlike CLIP) is trained to tell
           instances of one class apart, so it is the main subject-fidelity number.
  MCLIP-I, MDINO   the same with the images' backgrounds set to a constant before embedding
           (JeDi), so copying a reference's background earns nothing.

Scorers are duck-typed: anything with `embed_images(uint8 [N, H, W, 3]) -> [N, D]` (and, for
CLIP-T, `embed_texts(prompts) -> [N, D]`), L2-normalised rows. `suti.clip.ClipScorer` is the
CLIP one; `DinoScorer` here loads the real DINO ViT and the world's one
(`suti.identity_train`) from the same Hugging Face layout.

  dino = DinoScorer.from_pretrained("workdir/dino")
  scores = subject_scores(generated, prompts, references, clip=clip, dino=dino,
                          reference_masks=cluster.masks)
  table = aggregate([scores, ...])
"""
from __future__ import annotations

import json
import os
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from suti import hf_dir

PREPROCESSOR_FILE = "preprocessor_config.json"
# DINO's (and most ViTs') preprocessing when a directory has no preprocessor_config.json.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_GREY = (128, 128, 128)
# PIL resample codes (preprocessor_config.json's "resample") -> jax.image.resize methods.
_RESAMPLE = {0: "nearest", 1: "lanczos3", 2: "linear", 3: "cubic", 4: "linear", 5: "linear"}


# ----------------------------------------------------------------------------------------------
# Input checks: every metric takes uint8 RGB batches; mistakes are named, not broadcast.


def check_images(images, name: str = "images") -> np.ndarray:
  """uint8 [N, H, W, 3] with N >= 1, or ValueError naming `name` and what is wrong."""
  if isinstance(images, (list, tuple)):
    if not images:
      raise ValueError(f"{name} is empty; expected uint8 [N, H, W, 3] with N >= 1")
    shapes = {np.shape(x) for x in images}
    if len(shapes) != 1:
      raise ValueError(f"{name} have different shapes {sorted(shapes)}; expected one "
                       f"[H, W, 3] shape")
    images = np.stack([np.asarray(x) for x in images])
  images = np.asarray(images)
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f"{name} must have shape [N, H, W, 3] (RGB), got {images.shape}")
  if images.shape[0] == 0 or images.shape[1] == 0 or images.shape[2] == 0:
    raise ValueError(f"{name} is empty: shape {images.shape}")
  if images.dtype != np.uint8:
    raise ValueError(f"{name} must be uint8 in [0, 255], got dtype {images.dtype} (model "
                     f"outputs in [-1, 1] convert with suti.train_lib.to_uint8)")
  return images


def check_masks(masks, images: np.ndarray, name: str = "masks") -> np.ndarray:
  """bool [N, H, W] matching `images`, or ValueError."""
  if isinstance(masks, (list, tuple)):
    masks = np.stack([np.asarray(m) for m in masks]) if masks else np.zeros((0,))
  masks = np.asarray(masks)
  if masks.ndim == 4 and masks.shape[-1] == 1:
    masks = masks[..., 0]
  if masks.shape != images.shape[:3]:
    raise ValueError(f"{name} must have shape {images.shape[:3]} (one [H, W] mask per image), "
                     f"got {masks.shape}")
  if masks.dtype != bool:
    raise ValueError(f"{name} must be bool (True on the subject), got dtype {masks.dtype}")
  return masks


def check_prompts(prompts, count: int) -> list[str]:
  if isinstance(prompts, str):
    raise TypeError("prompts must be a list of strings, got one string")
  prompts = list(prompts)
  if len(prompts) != count:
    raise ValueError(f"got {len(prompts)} prompts for {count} images; expected one prompt "
                     f"per image")
  for i, prompt in enumerate(prompts):
    if not isinstance(prompt, str) or not prompt.strip():
      raise ValueError(f"prompt {i} is empty or not a string: {prompt!r}")
  return prompts


# ----------------------------------------------------------------------------------------------
# Building blocks.


def l2_normalize(x, eps: float = 1e-12):
  x = np.asarray(x, np.float32)
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), eps)


def mean_cosine_to_references(embeddings, references) -> np.ndarray:
  """[N] : for each row of `embeddings`, its average cosine with the rows of `references`."""
  return (l2_normalize(embeddings) @ l2_normalize(references).T).mean(axis=1)


def background_fill(scorer) -> np.ndarray:
  """uint8 [3]: the colour a scorer's masked-out pixels get.

  The scorer's own `mask_fill` when it has one (DinoScorer), else its normalisation mean
  (`image_mean`, or ClipScorer's `mean`), which the model then sees as exactly 0; else mid grey.
  """
  fill = getattr(scorer, "mask_fill", None)
  if fill is not None:
    return np.asarray(fill, np.uint8).reshape(3)
  for name in ("image_mean", "mean"):
    mean = getattr(scorer, name, None)
    if mean is not None and np.size(mean) == 3:
      return np.rint(255 * np.asarray(mean, np.float32)).astype(np.uint8).reshape(3)
  return np.asarray(_GREY, np.uint8)


def mask_background(images, masks, fill=_GREY) -> np.ndarray:
  """`images` with every pixel outside `masks` set to `fill` (uint8 [3])."""
  images = check_images(images)
  masks = check_masks(masks, images)
  return np.where(masks[..., None], images, np.asarray(fill, np.uint8)).astype(np.uint8)


# ----------------------------------------------------------------------------------------------
# DINO: a Hugging Face ViT's CLS embedding.


def _check_pretrained_dir(path) -> str:
  path = os.fspath(path)
  if not path:
    raise ValueError("DINO model path is empty (dino.path, or a workdir's dino/ folder)")
  hf_dir.check_model_dir(path, "DINO model")
  return path


def read_preprocessing(path) -> dict:
  """The parts of preprocessor_config.json the scorer follows, with ImageNet defaults.

  Images are resized straight to the model's image_size (DreamBench's images are square; a
  centre crop, if the file asks for one, would be a no-op after it).
  """
  prep = {"image_mean": IMAGENET_MEAN, "image_std": IMAGENET_STD, "do_normalize": True,
          "do_rescale": True, "rescale_factor": 1 / 255, "resample": 2}
  file = os.path.join(os.fspath(path), PREPROCESSOR_FILE)
  if os.path.isfile(file):
    with open(file, encoding="utf-8") as f:
      saved = json.load(f)
    prep.update({k: saved[k] for k in prep if saved.get(k) is not None})
  return prep


class DinoScorer:
  """CLS embeddings (after the final LayerNorm, L2-normalised) of a Flax ViT.

  `from_pretrained` reads a local Hugging Face directory: config.json plus flax_model.msgpack
  or model.safetensors, and preprocessor_config.json if present (else ImageNet mean / std).
  """

  def __init__(self, model, params, *, image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD,
               do_normalize: bool = True, do_rescale: bool = True,
               rescale_factor: float = 1 / 255, resample: int = 2, batch_size: int = 64):
    self.model = model
    self.params = jax.tree_util.tree_map(jnp.asarray, params)  # on device once, not per call
    self.image_size = int(model.config.image_size)
    self.image_mean = np.asarray(image_mean if do_normalize else (0., 0., 0.), np.float32)
    self.image_std = np.asarray(image_std if do_normalize else (1., 1., 1.), np.float32)
    self.rescale_factor = float(rescale_factor) if do_rescale else 1.0
    self.method = _RESAMPLE.get(int(resample), "linear")
    self.batch_size = int(batch_size)
    self.dim = int(model.config.hidden_size)
    self._embed = jax.jit(self._embed_batch)

  @classmethod
  def from_pretrained(cls, path, batch_size: int = 64) -> "DinoScorer":
    import transformers  # pylint: disable=import-outside-toplevel
    path = _check_pretrained_dir(path)
    # No pooler: DINO is read from the CLS token (its checkpoints' pooler is untrained), and
    # _do_init=False skips a random init of weights about to be replaced. The "pooler weights
    # not used" notice is expected, so it is silenced; missing weights are checked below.
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
      model, params = transformers.FlaxViTModel.from_pretrained(
          path, add_pooling_layer=False, _do_init=False)
    finally:
      transformers.logging.set_verbosity(verbosity)
    missing = _missing_weights(model, params)
    if missing:
      raise ValueError(f"DINO checkpoint in {path!r} lacks weights the ViT needs: "
                       f"{missing[:5]}")
    return cls(model, params, batch_size=batch_size, **read_preprocessing(path))

  @property
  def mask_fill(self) -> np.ndarray:
    """uint8 [3]: the normalisation mean, so masked-out pixels reach the ViT as ~0."""
    return np.rint(255 * self.image_mean).astype(np.uint8)

  def preprocess(self, images):
    """uint8 [B, H, W, 3] -> float [B, 3, S, S], the layout HF Flax ViTs take."""
    x = jnp.asarray(images, jnp.float32) * self.rescale_factor
    if x.shape[1:3] != (self.image_size, self.image_size):
      x = jax.image.resize(x, (x.shape[0], self.image_size, self.image_size, 3), self.method,
                           antialias=True)
    x = (x - self.image_mean) / self.image_std
    return jnp.transpose(x, (0, 3, 1, 2))

  def _embed_batch(self, params, images):
    out = self.model(self.preprocess(images), params=params, train=False)
    cls_token = out.last_hidden_state[:, 0]
    return cls_token / jnp.maximum(jnp.linalg.norm(cls_token, axis=-1, keepdims=True), 1e-12)

  def embed_images(self, images) -> np.ndarray:
    """uint8 [N, H, W, 3] -> float32 [N, D], L2-normalised CLS embeddings."""
    images = check_images(images)
    return embed_in_batches(lambda x: self._embed(self.params, x), images, self.batch_size)


def _missing_weights(model, params) -> list[str]:
  from flax import traverse_util  # pylint: disable=import-outside-toplevel
  wanted = set(traverse_util.flatten_dict(model.params_shape_tree))
  return sorted("/".join(k) for k in wanted - set(traverse_util.flatten_dict(params)))


def embed_in_batches(fn, images: np.ndarray, batch_size: int) -> np.ndarray:
  """fn over batches padded to a power of two (at most batch_size): a jitted fn compiles a
  few times, not once per image count."""
  out = []
  for start in range(0, len(images), batch_size):
    batch = images[start:start + batch_size]
    n = len(batch)
    padded = min(batch_size, 1 << (n - 1).bit_length())
    if padded > n:
      batch = np.concatenate([batch, np.repeat(batch[-1:], padded - n, 0)])
    out.append(np.asarray(fn(batch), np.float32)[:n])
  return np.concatenate(out)


# ----------------------------------------------------------------------------------------------
# The metrics.


def clip_t(clip, images, prompts) -> float:
  """Mean cosine between each image and its prompt (CLIP-T)."""
  images = check_images(images, "generated images")
  prompts = check_prompts(prompts, len(images))
  return float(np.mean(np.sum(l2_normalize(clip.embed_images(images))
                              * l2_normalize(clip.embed_texts(prompts)), axis=-1)))


def image_similarity(scorer, generated, references) -> float:
  """CLIP-I / DINO: mean over generated images of their average cosine to the references."""
  generated = check_images(generated, "generated images")
  references = check_images(references, "reference images")
  return float(mean_cosine_to_references(scorer.embed_images(generated),
                                         scorer.embed_images(references)).mean())


def _masked(scorer, images, masks):
  return images if masks is None else mask_background(images, masks, background_fill(scorer))


def subject_scores(generated, prompts: Sequence[str] | None, references, *, clip=None,
                   dino=None, generated_masks=None, reference_masks=None) -> dict:
  """All metrics for one subject's generated images; {name: float, 'num_images': int}.

  Args:
    generated: uint8 [N, H, W, 3], the images made for this subject.
    prompts: the N prompts they were made for (CLIP-T); None skips CLIP-T.
    references: uint8 [M, H', W', 3], the subject's real images.
    clip: a ClipScorer (clip_t, clip_i, mclip_i); None skips them.
    dino: a DinoScorer (dino, mdino); None skips them.
    generated_masks, reference_masks: bool [N, H, W] / [M, H', W'] subject masks. With either
      given, the masked variants are reported, masking each side that has masks. Generated
      images usually have none (no segmenter is run here), so only the references are masked
      then: the reference background can no longer be matched, which is the point of the
      masked metrics, while the generated image is still judged whole.
  """
  generated = check_images(generated, "generated images")
  references = check_images(references, "reference images")
  if generated_masks is not None:
    check_masks(generated_masks, generated, "generated masks")
  if reference_masks is not None:
    check_masks(reference_masks, references, "reference masks")
  if prompts is not None:
    prompts = check_prompts(prompts, len(generated))
  masked = generated_masks is not None or reference_masks is not None
  scores = {"num_images": len(generated)}
  for name, scorer in (("clip_i", clip), ("dino", dino)):
    if scorer is None:
      continue
    gen = scorer.embed_images(generated)
    scores[name] = float(mean_cosine_to_references(gen, scorer.embed_images(references)).mean())
    if name == "clip_i" and prompts is not None:
      text = l2_normalize(scorer.embed_texts(prompts))
      scores["clip_t"] = float(np.mean(np.sum(l2_normalize(gen) * text, axis=-1)))
    if masked:
      masked_gen = (gen if generated_masks is None else
                    scorer.embed_images(_masked(scorer, generated, generated_masks)))
      masked_ref = scorer.embed_images(_masked(scorer, references, reference_masks))
      scores["m" + name] = float(mean_cosine_to_references(masked_gen, masked_ref).mean())
  return scores


def aggregate(per_subject: Sequence[dict]) -> dict:
  """Image-weighted means over subjects, i.e. DreamBench's mean over all generated images.

  Metrics some subjects lack (e.g. masked ones where no masks were known) average over the
  subjects that have them. Returns {metric: mean, metric + '_se': its standard error over
  subjects (with at least 2 of them), 'num_subjects', 'num_images'}.

  The standard error treats subjects as the sample: each subject's mean carries its own
  sampling seeds, and on the world's 16x16 images one apprentice's 64-image DINO moved by
  0.06-0.08 with the seeds alone (docs/RESULTS.md, issue 7), so a table without it misleads.
  """
  if not per_subject:
    raise ValueError("aggregate needs at least one subject's scores")
  names = sorted({k for s in per_subject for k in s if k != "num_images"})
  out = {}
  for name in names:
    rows = [s for s in per_subject if name in s]
    weights = np.asarray([s.get("num_images", 1) for s in rows], np.float64)
    values = np.asarray([s[name] for s in rows], np.float64)
    out[name] = float(np.sum(weights * values) / weights.sum())
    if len(rows) >= 2:
      out[name + "_se"] = weighted_standard_error(values, weights)
  out["num_subjects"] = len(per_subject)
  out["num_images"] = int(sum(s.get("num_images", 1) for s in per_subject))
  return out


def paired_difference(per_subject_a: Sequence[dict], per_subject_b: Sequence[dict]) -> dict:
  """Method a minus method b on the same subjects: {metric: mean, metric + '_se'}.

  The mean is the difference of the two image-weighted means; its standard error comes from
  the per-subject differences, so what both methods share (a subject hard for every method)
  cancels, and the error is smaller than the two rows' errors combined (on the bench, 0.025
  DINO against 0.036). It is the test of "SuTI at least the experts'" (issue 7). Needs both
  methods scored on the same subjects with the same image counts.
  """
  if len(per_subject_a) != len(per_subject_b) or not per_subject_a:
    raise ValueError(f"paired_difference needs the same subjects for both methods, got "
                     f"{len(per_subject_a)} and {len(per_subject_b)}")
  counts_a = [s.get("num_images", 1) for s in per_subject_a]
  counts_b = [s.get("num_images", 1) for s in per_subject_b]
  if counts_a != counts_b:
    raise ValueError(f"paired_difference: image counts per subject differ: {counts_a} vs "
                     f"{counts_b}")
  names = set.intersection(*({k for k in s if k != "num_images"}
                              for s in [*per_subject_a, *per_subject_b]))
  # Per subject, a - b with its image count: aggregate's weighted mean and error of those.
  differences = [dict({k: a[k] - b[k] for k in names}, num_images=n)
                 for a, b, n in zip(per_subject_a, per_subject_b, counts_a)]
  out = aggregate(differences)
  del out["num_subjects"], out["num_images"]
  return out


def weighted_standard_error(values, weights) -> float:
  """Standard error of a weighted mean, with Kish's effective sample size (sum w)^2 / sum w^2.

  Equal weights give the textbook std(ddof=1) / sqrt(n); needs at least two values.
  """
  values, weights = np.asarray(values, np.float64), np.asarray(weights, np.float64)
  if len(values) < 2:
    raise ValueError(f"a standard error needs at least 2 values, got {len(values)}")
  mean = np.sum(weights * values) / weights.sum()
  variance = np.sum(weights * (values - mean)**2) / weights.sum()
  n_eff = weights.sum()**2 / np.sum(weights**2)
  return float(np.sqrt(variance / (n_eff - 1)))


def auc(positive, negative) -> float:
  """Area under the ROC curve: P(a positive pair scores above a negative one), ties half."""
  pos = np.asarray(positive, np.float64).ravel()
  neg = np.asarray(negative, np.float64).ravel()
  if not len(pos) or not len(neg):
    raise ValueError(f"auc needs positive and negative scores, got {len(pos)} and {len(neg)}")
  ranks = _average_ranks(np.concatenate([pos, neg]))
  return float((ranks[:len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def _average_ranks(x):
  """1-based ranks with ties sharing their mean rank (the Mann-Whitney U statistic)."""
  order = np.argsort(x, kind="mergesort")
  ranks = np.empty(len(x), np.float64)
  ranks[order] = np.arange(1, len(x) + 1)
  _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
  sums = np.bincount(inverse, weights=ranks)
  return (sums / counts)[inverse]
