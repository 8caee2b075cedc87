"""The SuTI apprentice: the base UNet reading demonstrations in context (Re-Imagen architecture).

    demos (image, caption) ──► Conditioning(t_demo, caption) ──► DownStack (the base's weights)
                                                                    │ feature map at each r in
                                                                    ▼ demo_attention_resolutions
    tokens_r = [features of demo 1..N (N * r * r) | captions of demo 1..N (N * L), projected]
    x_t, t, prompt ──► UNet ... demo_attentions_j(h, tokens_r) in the DownStack and UpStack ──► eps

Params are the base model's (trainable: {'unet', 'text'}) plus what the apprentice adds:
  trainable['unet'][...]['demo_attentions_{j}']   cross-attention, zero-initialised output
  trainable['unet'][...]['demo_mlps_{j}']         its feed-forward (demo_mlp_ratio > 0), ditto
  trainable['demo_caption'][str(r)]              caption tokens -> the features' width at r
so a model built from a base checkpoint (`init_from_base`) gives the base's outputs exactly.

A condition is {'tokens', 'mask'} (the prompt, as for the base) plus 'demo': the demo tokens per
resolution, {r: (tokens [B, M, C_r], mask [B, M])}. `encode_demos` computes them once per
generation; every denoising step reuses them. A demo masked out (demo dropout, guidance's
"no demos" branch, or zero demos at all) is invisible to attention; so are padded demo slots.
"""
from __future__ import annotations

import math
import re

from flax import traverse_util
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from suti import diffusion
from suti.config_lib import GUIDANCE_MODES  # noqa: F401  (re-exported for callers)
from suti.model import TextToImage
from suti.nn import initializers as init
from suti.nn import text as text_lib
from suti.nn import unet as unet_lib


def demo_resolutions(config) -> tuple[int, ...]:
  """config.apprentice.demo_attention_resolutions; empty means the UNet's lowest size."""
  resolutions = tuple(int(r) for r in config.apprentice.demo_attention_resolutions)
  return resolutions or (config.image_size // 2**(len(config.model.channel_mult) - 1),)


def level_channels(config, resolution: int) -> int:
  """Width of the DownStack feature map of size `resolution` (its level's ResBlocks)."""
  level = int(round(math.log2(config.image_size / resolution)))
  return config.model.channels * config.model.channel_mult[level]


class CaptionProjection(nn.Module):
  """Encoded caption tokens [.., L, D] -> [.., L, C_r] for each demo resolution r."""
  widths: tuple[tuple[int, int], ...]  # ((r, C_r), ...)

  @nn.compact
  def __call__(self, context):
    return {r: nn.Dense(c, kernel_init=init.lecun_normal(), name=str(r))(context)
            for r, c in self.widths}


class Apprentice:
  """Everything needed to train, sample and fine-tune the apprentice of one config."""

  def __init__(self, config, text_encoder: text_lib.TextEncoder | None = None):
    self.config = config
    self.base = TextToImage(config, text_encoder)  # tokenizer, text encoder, schedule
    self.text = self.base.text
    self.image_size = config.image_size
    self.schedule = self.base.schedule
    self.prediction = self.base.prediction
    self.resolutions = demo_resolutions(config)
    for r in self.resolutions:
      if r not in [config.image_size // 2**i for i in range(len(config.model.channel_mult))]:
        raise ValueError(f"apprentice.demo_attention_resolutions: {r} is not a feature-map size "
                         f"of this UNet (image_size {config.image_size}, "
                         f"{len(config.model.channel_mult)} levels)")
    self.demo_timestep = int(config.apprentice.demo_timestep)
    # absent from configs saved before it existed: those apprentices had no positions
    self.demo_positions = bool(config.apprentice.get("demo_positions", False))
    self.unet = unet_lib.from_config(config, demo_attention_resolutions=self.resolutions,
                                     demo_mlp_ratio=int(config.apprentice.demo_mlp_ratio),
                                     # absent from configs saved before it existed
                                     demo_num_heads=int(config.apprentice.get("demo_num_heads", 0)),
                                     demo_positions=self.demo_positions)
    self.cond_part, self.down_part, _, _ = self.unet.parts()
    self.caption_projection = CaptionProjection(
        tuple((r, level_channels(config, r)) for r in self.resolutions))
    # Bound methods compare equal per instance: samplers taking them as static jit arguments
    # compile once per model.
    self.denoise_fn = self._denoise
    self.denoise_uncached_fn = self._denoise_uncached
    self._encode_text_jit = jax.jit(self.encode_text)
    self._encode_demos_jit = jax.jit(self.encode_demos)

  # ------------------------------------------------------------------------------ params
  def init(self, rng) -> tuple[dict, dict]:
    """Fresh (trainable, frozen) params: a base init plus the new layers."""
    trainable = jax.jit(self._init_trainable)(rng)
    return trainable, ({} if self.text.trainable else self.base.frozen_params())

  def abstract_init(self) -> tuple[dict, dict]:
    """The params as ShapeDtypeStructs (nothing allocated; frozen encoders are not read)."""
    _, frozen = self.base.abstract_init()
    return jax.eval_shape(self._init_trainable, jax.random.PRNGKey(0)), frozen

  def _init_trainable(self, rng):
    unet_rng, text_rng, proj_rng = jax.random.split(rng, 3)
    trainable = {"unet": self.unet.init(unet_rng, *unet_lib.dummy_inputs(self.config),
                                        extra_context=self.no_demos(1))["params"]}
    if self.text.trainable:
      trainable["text"] = self.text.init_params(text_rng)
    context = jnp.zeros((1, 1, self.config.model.channels), jnp.float32)  # Conditioning's width
    trainable["demo_caption"] = self.caption_projection.init(proj_rng, context)["params"]
    return trainable

  def frozen_params(self) -> dict:
    return self.base.frozen_params()

  def init_from_base(self, base_trainable: dict, rng) -> dict:
    """The apprentice's trainable params: every base param as it is, new layers initialised.

    Raises ValueError when a base param has no place in the apprentice or a shape differs
    (a base checkpoint of another config).
    """
    fresh, _ = self.init(rng)
    fresh_flat = _flatten(fresh)
    base_flat = _flatten(base_trainable)
    unused = sorted(set(base_flat) - set(fresh_flat))
    if unused:
      raise ValueError(f"base params with no place in the apprentice: {unused[:5]}")
    for path, value in fresh_flat.items():  # check everything before converting anything
      if path in base_flat and tuple(base_flat[path].shape) != tuple(value.shape):
        raise ValueError(f"base param {path}: shape {tuple(base_flat[path].shape)}, the "
                         f"apprentice expects {tuple(value.shape)} (another config?)")
      if path not in base_flat and not is_new_param(path):
        raise ValueError(f"the base model has no param {path}")
    out = {path: jnp.asarray(base_flat[path]) if path in base_flat else value
           for path, value in fresh_flat.items()}
    return _unflatten(out)

  # ------------------------------------------------------------------------------ conditions
  def tokenize(self, prompts) -> dict:
    return self.base.tokenize(prompts)

  def null_tokens(self, batch_size: int) -> dict:
    return self.base.null_tokens(batch_size)

  def encode_text(self, trainable, frozen, tokens: dict) -> dict:
    """{'ids', 'mask'} [..., L] -> {'tokens' [..., L, D], 'mask'}; pre-encoded passes through."""
    if "tokens" in tokens:
      return {"tokens": tokens["tokens"], "mask": tokens["mask"]}
    ids, mask = tokens["ids"], tokens["mask"]
    lead = ids.shape[:-1]
    flat = {"ids": ids.reshape(-1, ids.shape[-1]), "mask": mask.reshape(-1, mask.shape[-1])}
    cond = self.base.encode(trainable, frozen, flat)
    return {"tokens": cond["tokens"].reshape(lead + cond["tokens"].shape[-2:]),
            "mask": cond["mask"].reshape(lead + cond["mask"].shape[-1:])}

  def encode_demos(self, trainable, demo_images, demo_captions: dict, demo_mask) -> dict:
    """Demo tokens for the demo attention, from the base UNet's own DownStack.

    demo_images [B, N, H, W, 3] in [-1, 1]; demo_captions: encoded {'tokens' [B, N, L, D],
    'mask' [B, N, L]}; demo_mask [B, N] bool (False: the slot is ignored).
    Returns {r: (tokens [B, N * (r*r + L), C_r], mask [B, N * (r*r + L)])}.
    """
    b, n = demo_images.shape[:2]
    unet = trainable["unet"]
    images = demo_images.reshape((b * n,) + demo_images.shape[2:])
    caption = demo_captions["tokens"].reshape((b * n,) + demo_captions["tokens"].shape[2:])
    caption_mask = demo_captions["mask"].reshape(b * n, -1)
    # The demo is clean; a fixed timestep (Re-Imagen: 0) tells the DownStack how noisy it is.
    t = jnp.full((b * n,), self.demo_timestep, jnp.int32)
    emb, context = self.cond_part.apply({"params": unet["cond"]}, t, caption, caption_mask)
    _, skips = self.down_part.apply({"params": unet["down"]}, images, emb, context,
                                    caption_mask)
    features = unet_lib.demo_context(skips, self.resolutions, num_demos=n, mask=demo_mask,
                                     positions=self.demo_positions)
    captions = self.caption_projection.apply({"params": trainable["demo_caption"]}, context)
    keep = jnp.asarray(demo_mask, bool)[:, :, None] & caption_mask.reshape(b, n, -1)
    out = {}
    for r in self.resolutions:
      tokens, mask = features[r]
      cap = captions[r].reshape(b, -1, captions[r].shape[-1]).astype(tokens.dtype)
      out[r] = (jnp.concatenate([tokens, cap], axis=1),
                jnp.concatenate([mask, keep.reshape(b, -1)], axis=1))
    return out

  def no_demos(self, batch_size: int) -> dict:
    """The 'no demonstrations' context: one masked token per resolution."""
    return {r: (jnp.zeros((batch_size, 1, level_channels(self.config, r)), jnp.float32),
                jnp.zeros((batch_size, 1), bool)) for r in self.resolutions}

  def condition(self, trainable, frozen, batch: dict) -> dict:
    """A training or sampling batch -> cond {'tokens', 'mask', 'demo'}.

    batch: the prompt as {'ids', 'mask'} (or pre-encoded {'tokens', 'mask'}), and the demos
    as 'demo_images' [B, N, H, W, 3], 'demo_ids' / 'demo_id_mask' [B, N, L] (or pre-encoded
    'demo_tokens' [B, N, L, D] / 'demo_id_mask'), 'demo_mask' [B, N]. N = 0: no demos.
    """
    prompt = ({"tokens": batch["tokens"], "mask": batch["mask"]} if "tokens" in batch
              else {"ids": batch["ids"], "mask": batch["mask"]})
    cond = self.encode_text(trainable, frozen, prompt)
    if batch["demo_images"].shape[1] == 0:
      return dict(cond, demo=self.no_demos(batch["demo_images"].shape[0]))
    captions = ({"tokens": batch["demo_tokens"], "mask": batch["demo_id_mask"]}
                if "demo_tokens" in batch else
                {"ids": batch["demo_ids"], "mask": batch["demo_id_mask"]})
    captions = self.encode_text(trainable, frozen, captions)
    demo = self.encode_demos(trainable, batch["demo_images"], captions, batch["demo_mask"])
    return dict(cond, demo=demo)

  # ------------------------------------------------------------------------------ denoising
  def _denoise(self, unet_params, x_t, t, cond):
    return self.unet.apply({"params": unet_params}, x_t, t, cond["tokens"], cond["mask"],
                           extra_context=cond["demo"])

  def _denoise_uncached(self, trainable, x_t, t, cond):
    """The same prediction, re-encoding the demos from pixels on every call (for tests)."""
    demo = self.encode_demos(trainable, cond["demo_images"], cond["demo_captions"],
                             cond["demo_mask"])
    return self._denoise(trainable["unet"], x_t, t, dict(cond, demo=demo))

  # ------------------------------------------------------------------------------ training
  def loss(self, trainable, frozen, batch, rng):
    """Eq. (5) of SuTI: the denoising loss of y_s given p_s and the demos C_s."""
    cond = self.condition(trainable, frozen, batch)
    ac = self.config.apprentice
    return diffusion.diffusion_loss(
        self.schedule, self.denoise_fn, trainable["unet"], batch["image"], cond, rng,
        self.prediction, high_noise_fraction=float(ac.high_noise_fraction),
        high_noise_from=float(ac.high_noise_from), weight_cap=float(ac.loss_weight_cap))


NEW_PARAM = re.compile(r"(^|/)demo_(attentions|mlps)_\d+(/|$)|^demo_caption(/|$)")


def is_new_param(path: str) -> bool:
  """Whether a flattened param path ('unet/down/...') is one the apprentice adds."""
  return bool(NEW_PARAM.search(path))


def _flatten(tree) -> dict:
  return traverse_util.flatten_dict(tree, sep="/")


def _unflatten(flat: dict) -> dict:
  return traverse_util.unflatten_dict(flat, sep="/")


def new_layer_labels(trainable):
  """'train' for the layers the apprentice adds, 'frozen' for the base's (optax.multi_transform
  labels: with apprentice.freeze_base the base's weights stay exactly as pre-trained)."""
  def label(path, _):
    return "train" if is_new_param("/".join(str(getattr(k, "key", k)) for k in path)) else "frozen"
  return jax.tree_util.tree_map_with_path(label, trainable)


def new_param_count(trainable) -> int:
  return sum(int(np.prod(v.shape)) for k, v in _flatten(trainable).items() if is_new_param(k))
