"""The text-to-image diffusion model: UNet + text encoder + noise schedule, as pure functions.

Params are split in two plain dicts:
  trainable: {'unet': ..., 'text': ...}  ('text' only for the world encoder, trained jointly)
  frozen:    {'text': ...}               (a pretrained CLIP / T5 encoder), or {}
so K experts stack `trainable['unet']` with a leading axis and share everything else.
A condition `cond` is {'tokens': [B, L, D], 'mask': [B, L] bool}: encoded text.
"""
from __future__ import annotations

import jax
import numpy as np

from suti import diffusion
from suti.nn import text as text_lib
from suti.nn import unet as unet_lib


class TextToImage:
  """Everything needed to train and sample the base model of one config."""

  def __init__(self, config, text_encoder: text_lib.TextEncoder | None = None):
    self.config = config
    self.image_size = config.image_size
    self.unet = unet_lib.from_config(config)
    self.text = text_encoder if text_encoder is not None else text_lib.make_text_encoder(config)
    self.schedule = diffusion.from_config(config)
    self.prediction = config.diffusion.prediction
    # One bound method per model: samplers take denoise_fn as a static jit argument, and bound
    # methods of the same instance compare equal, so sampling compiles once per model.
    self.denoise_fn = self._denoise
    # Eager encoding would compile every op on its own (seconds on CPU); jit it once.
    self._encode_jit = jax.jit(self.encode)

  def signature(self) -> tuple:
    """What this model's traced programs depend on (params are arguments, not part of it):
    two models with equal signatures can share compiled functions."""
    c = self.config
    return (type(self).__name__, c.image_size, c.model.to_json(), c.diffusion.to_json())

  # ------------------------------------------------------------------------------ params
  def init(self, rng) -> tuple[dict, dict]:
    """Fresh (trainable, frozen) params."""
    unet_rng, text_rng = jax.random.split(rng)
    trainable = {"unet": unet_lib.init_params(self.unet, unet_rng, self.config)}
    text_params = self.text.init_params(text_rng)
    if self.text.trainable:
      return dict(trainable, text=text_params), {}
    return trainable, {"text": text_params}

  def abstract_init(self) -> tuple[dict, dict]:
    """The params as ShapeDtypeStructs (nothing allocated)."""
    return jax.eval_shape(self.init, jax.random.PRNGKey(0))

  def frozen_params(self) -> dict:
    """The frozen pretrained text encoder's params ({} for the world encoder)."""
    return {} if self.text.trainable else {"text": self.text.init_params(jax.random.PRNGKey(0))}

  # ------------------------------------------------------------------------------ conditions
  def tokenize(self, prompts) -> dict:
    ids, mask = self.text.tokenize(list(prompts))
    return {"ids": np.asarray(ids, np.int32), "mask": np.asarray(mask, bool)}

  def encode(self, trainable, frozen, tokens: dict) -> dict:
    """Token ids -> cond. Text params come from `trainable` or `frozen`, whichever has them."""
    text_params = trainable["text"] if self.text.trainable else frozen["text"]
    encoded, mask = self.text.encode(text_params, tokens["ids"], tokens["mask"])
    return {"tokens": encoded, "mask": mask}

  def _denoise(self, unet_params, x_t, t, cond):
    return self.unet.apply({"params": unet_params}, x_t, t, cond["tokens"], cond["mask"])

  # ------------------------------------------------------------------------------ training
  def loss(self, trainable, frozen, batch, rng):
    """Eq. (4) of SuTI / the DDPM loss with w_t = 1, on {'image', 'ids', 'mask'} or on
    {'image', 'tokens', 'mask'} (pre-encoded text, e.g. when planning a frozen T5)."""
    if "tokens" in batch:
      cond = {"tokens": batch["tokens"], "mask": batch["mask"]}
    else:
      cond = self.encode(trainable, frozen, batch)
    return diffusion.diffusion_loss(self.schedule, self.denoise_fn, trainable["unet"],
                                    batch["image"], cond, rng, self.prediction)

  # ------------------------------------------------------------------------------ sampling
  def null_tokens(self, batch_size: int) -> dict:
    """The classifier-free 'no text' condition: the empty prompt, as caption dropout trains."""
    return self.tokenize([""] * batch_size)

  def sample(self, trainable, frozen, prompts, rng, *, sampler="ddim", steps=50,
             guidance=1.0, threshold="dynamic") -> jax.Array:
    """Images [B, H, W, 3] in [-1, 1] for prompts, with classifier-free guidance."""
    cond = self._encode_jit(trainable, frozen, self.tokenize(prompts))
    conds = [cond]
    weights = []
    if guidance != 1.0:
      conds = [self._encode_jit(trainable, frozen, self.null_tokens(len(prompts))), cond]
      weights = [guidance]
    shape = (len(prompts), self.image_size, self.image_size, 3)
    return diffusion.sample(
        self.denoise_fn, trainable["unet"], self.schedule, conds, rng, shape, weights=weights,
        sampler=sampler, steps=steps, prediction=self.prediction, threshold=threshold,
        percentile=self.config.diffusion.dynamic_threshold_percentile)
