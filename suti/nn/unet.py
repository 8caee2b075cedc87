"""An Imagen-style text-conditioned UNet (Saharia et al., 2022), in Flax linen.

    x_t ──conv_in──► DownStack ──h──► MidStack ──h──► UpStack ──► prediction [B, H, W, 3]
                        │ skips ───────────────────────►│
    t, text ──► Conditioning ──emb, context──► every ResBlock (FiLM) / cross-attention

The four parts are separate modules ('cond', 'down', 'mid', 'up' in the params) so the SuTI
apprentice (Re-Imagen architecture) can call the DownStack again, with the same weights, to encode
demonstration images, and attend to those features inside both stacks. `demo_attention_resolutions`
adds that attention: new params named `demo_attentions_{j}` (and `demo_mlps_{j}`, a feed-forward
after each, when demo_mlp_ratio > 0) beside the existing ones, with zero-initialised output
projections so a model built from base params behaves exactly like the base.

Params are float32 plain nested dicts; `dtype` is only the compute dtype.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from suti.nn import initializers as init

# Demo features for the extra attention: resolution -> tokens [B, N, C] or (tokens, mask [B, N]).
ExtraContext = Mapping[int, Any]


def position_embedding(size: int, dim: int) -> np.ndarray:
  """Fixed 2D sinusoids of the cells of a size x size map -> [size * size, dim] (row-major).

  Positions are fractions of the image, (i + 0.5) / size, so maps of different sizes agree on
  where a cell is; frequencies run geometrically from 1 to size / 2 cycles per image (the
  finest resolves neighbouring cells). Channels: [sin x, cos x, sin y, cos y] blocks, zero-padded.
  """
  quarter = dim // 4
  if quarter == 0:
    raise ValueError(f"position_embedding needs dim >= 4, got {dim}")
  freqs = np.geomspace(1.0, max(size / 2, 1.0), quarter)
  u = (np.arange(size) + 0.5) / size
  angle = 2 * np.pi * u[:, None] * freqs[None]                          # [size, quarter]
  x = np.concatenate([np.sin(angle), np.cos(angle)], -1)               # [size, 2 * quarter]
  grid = np.concatenate([np.repeat(x[None], size, 0),                  # varies along columns
                         np.repeat(x[:, None], size, 1)], -1)          # varies along rows
  out = np.zeros((size * size, dim), np.float32)
  out[:, :4 * quarter] = grid.reshape(size * size, 4 * quarter)
  return out


def sinusoidal_embedding(t, dim, max_period=10_000.0):
  """Transformer-style embedding of (integer or continuous) timesteps t [B] -> [B, dim]."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = jnp.asarray(t, jnp.float32)[:, None] * freqs[None]
  emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
  return jnp.pad(emb, ((0, 0), (0, dim % 2)))


def count_params(tree) -> int:
  """Number of scalars in a pytree of arrays or jax.ShapeDtypeStructs (from eval_shape)."""
  return int(sum(np.prod(x.shape, dtype=np.int64) for x in jax.tree_util.tree_leaves(tree)))


def _conv(features, dtype, name, kernel_size=(3, 3), **kw):
  return nn.Conv(features, kernel_size, dtype=dtype, name=name,
                 **{"kernel_init": init.lecun_normal(), **kw})


def _dense(features, dtype, name, **kw):
  # DenseGeneral so attention can project straight to [..., heads, head_dim].
  return nn.DenseGeneral(features, dtype=dtype, name=name,
                         **{"kernel_init": init.lecun_normal(), **kw})


def _group_norm(channels, name=None):
  # 32 groups as in DDPM/ADM; fewer when a tiny model has fewer channels. float32 for stability.
  return nn.GroupNorm(num_groups=math.gcd(32, channels), dtype=jnp.float32, name=name)


def _masked_softmax(logits, mask):
  """Softmax over the last axis of float32 logits [B, H, N, M]; mask [B, M] bool or None.

  A fully masked row (no text: the classifier-free "null" condition) gets all-zero weights, so
  it attends to nothing instead of uniformly to padding."""
  if mask is not None:
    logits = jnp.where(mask[:, None, None, :], logits, -jnp.inf)
  peak = jnp.max(logits, axis=-1, keepdims=True)
  peak = jnp.where(jnp.isfinite(peak), peak, 0.0)  # a fully masked row: exp(-inf) = 0 below
  e = jnp.exp(logits - peak)
  return e / jnp.maximum(jnp.sum(e, axis=-1, keepdims=True), jnp.finfo(jnp.float32).tiny)


@jax.custom_vjp
def _attend_heads(q, k, v, mask):
  """softmax(q k^T) v, heads-major: q [B, H, N, D], k/v [B, H, M, D] -> [B, H, N, D]."""
  return _attend_heads_fwd(q, k, v, mask)[0]


def _attend_heads_fwd(q, k, v, mask):
  # float32 logits and softmax even when computing in bfloat16.
  logits = jnp.einsum("bhnd,bhmd->bhnm", q, k, preferred_element_type=jnp.float32)
  weights = _masked_softmax(logits, mask)
  out = jnp.einsum("bhnm,bhmd->bhnd", weights.astype(v.dtype), v)
  return out, (q, k, v, weights, out, mask)


def _attend_heads_bwd(residuals, d_out):
  # The softmax's backward pass written out, as FlashAttention does: the row sums
  # sum_m w * dw equal d_out . out, so the logits-sized tensors are read far fewer times than
  # in autodiff's version (the demo attention at 16x16 trains ~2x faster; RESULTS, issue 7).
  q, k, v, weights, out, mask = residuals
  d_v = jnp.einsum("bhnm,bhnd->bhmd", weights.astype(d_out.dtype), d_out)
  d_weights = jnp.einsum("bhnd,bhmd->bhnm", d_out, v, preferred_element_type=jnp.float32)
  rows = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1, keepdims=True)
  d_logits = weights * (d_weights - rows)
  d_q = jnp.einsum("bhnm,bhmd->bhnd", d_logits.astype(k.dtype), k)
  d_k = jnp.einsum("bhnm,bhnd->bhmd", d_logits.astype(q.dtype), q)
  d_mask = None if mask is None else np.zeros(mask.shape, jax.dtypes.float0)
  return d_q, d_k, d_v, d_mask


_attend_heads.defvjp(_attend_heads_fwd, _attend_heads_bwd)


def _attend(q, k, v, mask=None):
  """Multi-head attention. q [B, N, H, D], k/v [B, M, H, D], mask [B, M] bool (True: attend)."""
  q = q * jnp.asarray(1.0 / math.sqrt(q.shape[-1]), q.dtype)
  heads_major = lambda x: jnp.swapaxes(x, 1, 2)  # noqa: E731  [B, N, H, D] <-> [B, H, N, D]
  mask = None if mask is None else jnp.asarray(mask, bool)
  return heads_major(_attend_heads(heads_major(q), heads_major(k), heads_major(v), mask))


class ResBlock(nn.Module):
  """GroupNorm-SiLU-Conv twice; the conditioning embedding scales and shifts the second norm."""
  out_channels: int
  dropout: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, emb, train=False):
    h = nn.silu(_group_norm(x.shape[-1], "norm1")(x))
    h = _conv(self.out_channels, self.dtype, "conv1")(h)
    scale, shift = jnp.split(_dense(2 * self.out_channels, self.dtype, "film")(
        nn.silu(emb))[:, None, None, :], 2, axis=-1)
    h = _group_norm(self.out_channels, "norm2")(h) * (1 + scale) + shift
    h = nn.Dropout(self.dropout, deterministic=not train)(nn.silu(h))
    # Zero init: every block starts as the identity, which keeps deep UNets stable early on.
    h = _conv(self.out_channels, self.dtype, "conv2", kernel_init=init.zeros)(h)
    if x.shape[-1] != self.out_channels:
      x = _conv(self.out_channels, self.dtype, "skip", kernel_size=(1, 1))(x)
    return (x + h).astype(self.dtype)


class SelfAttention(nn.Module):
  """Self-attention over all positions of a feature map [B, H, W, C]."""
  num_heads: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    b, hh, ww, c = x.shape
    h = _group_norm(c, "norm")(x).reshape(b, hh * ww, c)
    qkv = _dense((3, self.num_heads, c // self.num_heads), self.dtype, "qkv")(h)
    out = _attend(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2])
    out = _dense(c, self.dtype, "out", axis=(-2, -1), kernel_init=init.zeros)(out)
    return (x + out.reshape(x.shape)).astype(self.dtype)


class CrossAttention(nn.Module):
  """Feature-map queries attend to context tokens [B, M, D] (text, or demo features)."""
  num_heads: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, context, mask=None, query_positions=None):
    b, hh, ww, c = x.shape
    heads, head_dim = self.num_heads, c // self.num_heads
    h = nn.LayerNorm(dtype=jnp.float32, name="norm")(x.reshape(b, hh * ww, c))
    if query_positions is not None:  # [hh * ww, c], e.g. position_embedding(hh, c)
      h = h + query_positions
    q = _dense((heads, head_dim), self.dtype, "q")(h)
    kv = _dense((2, heads, head_dim), self.dtype, "kv")(context)
    out = _attend(q, kv[:, :, 0], kv[:, :, 1], mask)
    # Zero init: a new attention layer (e.g. demo attention added to a trained base) starts as a
    # no-op, so the model's output is unchanged until it learns to use the new context.
    out = _dense(c, self.dtype, "out", axis=(-2, -1), kernel_init=init.zeros)(out)
    return (x + out.reshape(x.shape)).astype(self.dtype)


class FeedForward(nn.Module):
  """Pre-norm MLP with a residual: LayerNorm, Dense(ratio * C), GELU, Dense(C) zero-initialised
  (a no-op until trained), as Flamingo follows each new cross-attention with a dense block."""
  ratio: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    h = nn.LayerNorm(dtype=jnp.float32, name="norm")(x)
    h = nn.gelu(_dense(self.ratio * c, self.dtype, "fc1")(h))
    h = _dense(c, self.dtype, "fc2", kernel_init=init.zeros)(h)
    return (x + h).astype(self.dtype)


def _unpack(extra_context, resolution):
  """extra_context[resolution] as (tokens, mask or None); (None, None) when absent."""
  if not extra_context or resolution not in extra_context:
    return None, None
  value = extra_context[resolution]
  return value if isinstance(value, (tuple, list)) else (value, None)


class _Stack(nn.Module):
  """Hyperparameters shared by the UNet and each of its parts (kept identical by `UNet.parts`)."""
  channels: int = 32
  channel_mult: Sequence[int] = (1, 2, 2)
  num_res_blocks: int = 1
  attention_resolutions: Sequence[int] = (8,)
  cross_attention_resolutions: Sequence[int] = (16, 8)
  demo_attention_resolutions: Sequence[int] = ()
  demo_mlp_ratio: int = 0  # > 0: a FeedForward (`demo_mlps_{j}`) after each demo attention
  demo_num_heads: int = 0  # heads of the demo attentions; 0: num_heads
  # Demo attention with positions: the same fixed 2D sinusoids added to its queries and (by
  # `demo_context(positions=True)`) to the demo feature tokens, so it can match a target's
  # cell to the same place in the demos, not only by content.
  demo_positions: bool = False
  num_heads: int = 4
  dropout: float = 0.0
  image_size: int = 32
  out_channels: int = 3
  context_channels: int = 0  # width text is projected to for cross-attention; 0: channels
  dtype: Any = jnp.float32

  @property
  def demo_heads(self) -> int:
    """Heads of the demo attentions: demo_num_heads, or the UNet's own num_heads when 0."""
    return self.demo_num_heads or self.num_heads

  def resolution(self, level):
    """Feature-map size at a level; attention placement is fixed by it, not by the input."""
    return self.image_size // 2**level

  def _attentions(self, h, j, level, context, context_mask, extra_context):
    """Self-, text cross- and demo attention after the j-th ResBlock, where configured."""
    res = self.resolution(level)
    if res in self.attention_resolutions:
      h = SelfAttention(self.num_heads, self.dtype, name=f"attentions_{j}")(h)
    if res in self.cross_attention_resolutions:
      h = CrossAttention(self.num_heads, self.dtype, name=f"cross_attentions_{j}")(
          h, context, context_mask)
    demo, demo_mask = _unpack(extra_context, res)
    if res in self.demo_attention_resolutions and demo is not None:
      positions = (jnp.asarray(position_embedding(res, h.shape[-1]))
                   if self.demo_positions else None)
      h = CrossAttention(self.demo_heads, self.dtype, name=f"demo_attentions_{j}")(
          h, demo.astype(self.dtype), demo_mask, query_positions=positions)
      if self.demo_mlp_ratio:
        h = FeedForward(self.demo_mlp_ratio, self.dtype, name=f"demo_mlps_{j}")(h)
    return h


class Conditioning(_Stack):
  """t [B] and text -> (emb [B, 4C] for the ResBlocks, context [B, L, D] for cross-attention)."""

  @nn.compact
  def __call__(self, t, text_tokens, text_mask):
    width = 4 * self.channels
    emb = sinusoidal_embedding(t, self.channels)
    emb = _dense(width, jnp.float32, "time_mlp_0")(emb)
    emb = _dense(width, jnp.float32, "time_mlp_1")(nn.silu(emb))
    # Imagen adds a pooled text embedding to the timestep embedding (masked mean over tokens;
    # an all-False mask pools to zero, the unconditional input).
    text_tokens = text_tokens.astype(jnp.float32)
    m = text_mask[..., None].astype(jnp.float32)
    pooled = (text_tokens * m).sum(1) / jnp.maximum(m.sum(1), 1.0)
    emb = emb + _dense(width, jnp.float32, "text_pool")(
        nn.LayerNorm(name="text_pool_norm")(pooled))
    # Frozen encoders (T5, CLIP) emit tokens on their own scales: normalise, then project once to
    # a small context width, so the ~20 cross-attention layers need not each read 4096-d T5.
    context = nn.LayerNorm(name="text_norm")(text_tokens)
    context = _dense(self.context_channels or self.channels, jnp.float32, "text_proj")(context)
    return emb.astype(self.dtype), context.astype(self.dtype)


class DownBlock(_Stack):
  """One level of the DownStack: ResBlocks (+ attention), then a strided-conv downsample."""
  level: int = 0

  @nn.compact
  def __call__(self, h, emb, context, context_mask, extra_context=None, train=False):
    out_ch = self.channels * self.channel_mult[self.level]
    skips = []
    for j in range(self.num_res_blocks):
      h = ResBlock(out_ch, self.dropout, self.dtype, name=f"resnets_{j}")(h, emb, train)
      h = self._attentions(h, j, self.level, context, context_mask, extra_context)
      skips.append(h)
    if self.level < len(self.channel_mult) - 1:
      h = _conv(out_ch, self.dtype, "downsample", strides=(2, 2))(h)
      skips.append(h)
    return h, skips


class UpBlock(_Stack):
  """One level of the UpStack: ResBlocks over [h, skip] (+ attention), then upsample."""
  level: int = 0

  @nn.compact
  def __call__(self, h, skips, emb, context, context_mask, extra_context=None, train=False):
    out_ch = self.channels * self.channel_mult[self.level]
    for j in range(self.num_res_blocks + 1):
      h = jnp.concatenate([h, skips.pop()], axis=-1)
      h = ResBlock(out_ch, self.dropout, self.dtype, name=f"resnets_{j}")(h, emb, train)
      h = self._attentions(h, j, self.level, context, context_mask, extra_context)
    if self.level > 0:
      b, hh, ww, c = h.shape
      h = jax.image.resize(h, (b, 2 * hh, 2 * ww, c), "nearest")
      h = _conv(out_ch, self.dtype, "upsample")(h)
    return h


class DownStack(_Stack):
  """x [B, H, W, 3] -> (h at the lowest resolution, skips: every intermediate feature map).

  skips[0] is conv_in's output; then, per level, one per ResBlock and one per downsample, so
  the feature maps of size r are `[s for s in skips if s.shape[1] == r]` (what a demo encoder
  would attend to).
  """

  @nn.compact
  def __call__(self, x, emb, context, context_mask, extra_context=None, train=False):
    h = _conv(self.channels, self.dtype, "conv_in")(x.astype(self.dtype))
    skips = [h]
    for level in range(len(self.channel_mult)):
      h, level_skips = DownBlock(**_fields(self), level=level, name=f"down_blocks_{level}")(
          h, emb, context, context_mask, extra_context, train)
      skips += level_skips
    return h, skips


class MidStack(_Stack):
  """ResBlock, self-attention (+ text cross-attention), ResBlock at the lowest resolution."""

  @nn.compact
  def __call__(self, h, emb, context, context_mask, train=False):
    out_ch = h.shape[-1]
    res = self.resolution(len(self.channel_mult) - 1)
    h = ResBlock(out_ch, self.dropout, self.dtype, name="resnets_0")(h, emb, train)
    h = SelfAttention(self.num_heads, self.dtype, name="attentions_0")(h)
    if res in self.cross_attention_resolutions:
      h = CrossAttention(self.num_heads, self.dtype, name="cross_attentions_0")(
          h, context, context_mask)
    return ResBlock(out_ch, self.dropout, self.dtype, name="resnets_1")(h, emb, train)


class UpStack(_Stack):
  """(h, skips from the DownStack) -> prediction [B, H, W, out_channels], float32."""

  @nn.compact
  def __call__(self, h, skips, emb, context, context_mask, extra_context=None, train=False):
    skips = list(skips)  # consumed from the end; leave the caller's list alone
    for level in reversed(range(len(self.channel_mult))):
      h = UpBlock(**_fields(self), level=level, name=f"up_blocks_{level}")(
          h, skips, emb, context, context_mask, extra_context, train)
    assert not skips, f"{len(skips)} skip connections left over"
    h = nn.silu(_group_norm(h.shape[-1], "norm_out")(h))
    h = _conv(self.out_channels, self.dtype, "conv_out", kernel_init=init.zeros)(h)
    return h.astype(jnp.float32)


def _fields(module: _Stack) -> dict:
  """The shared hyperparameters of any part, to build another part that matches it."""
  return {name: getattr(module, name) for name in _Stack.__dataclass_fields__
          if name not in ("parent", "name")}


class UNet(_Stack):
  """UNet(...)(x_t [B,H,W,3], t [B], text_tokens [B,L,D], text_mask [B,L]) -> [B,H,W,3].

  `extra_context` (resolution -> demo tokens) feeds the layers `demo_attention_resolutions`
  adds; without it they are skipped. An all-False text_mask is the unconditional input.
  """

  def parts(self):
    """Unbound (Conditioning, DownStack, MidStack, UpStack), applied with params['cond'], ..."""
    kw = dict(_fields(self), parent=None)  # top-level modules, not children of this UNet
    return Conditioning(**kw), DownStack(**kw), MidStack(**kw), UpStack(**kw)

  def setup(self):
    kw = _fields(self)
    self.cond = Conditioning(**kw)
    self.down = DownStack(**kw)
    self.mid = MidStack(**kw)
    self.up = UpStack(**kw)

  def __call__(self, x, t, text_tokens, text_mask, extra_context=None, train=False):
    emb, context = self.cond(t, text_tokens, text_mask)
    h, skips = self.down(x, emb, context, text_mask, extra_context, train)
    h = self.mid(h, emb, context, text_mask, train)
    return self.up(h, skips, emb, context, text_mask, extra_context, train)


def demo_context(skips, resolutions, num_demos=1, mask=None, positions=False) -> dict:
  """DownStack skips of B * num_demos demo images -> `extra_context` for B examples.

  At each size r the last feature map (the level's final ResBlock) becomes r*r tokens, and the
  num_demos demos of an example are concatenated: {r: (tokens [B, num_demos*r*r, C], mask)}.
  mask [B, num_demos] bool drops demos (e.g. demo dropout for guidance); None keeps all.
  positions: add `position_embedding(r, C)` to each demo's tokens (for a UNet built with
  demo_positions=True, which adds the same to its queries).
  """
  out = {}
  for r in resolutions:
    feature = [s for s in skips if s.shape[1] == r][-1]
    bk, _, _, c = feature.shape
    if positions:
      feature = feature + jnp.asarray(position_embedding(r, c)).reshape(r, r, c).astype(
          feature.dtype)
    tokens = feature.reshape(bk // num_demos, num_demos * r * r, c)
    keep = (jnp.ones((bk // num_demos, num_demos), bool) if mask is None
            else jnp.asarray(mask, bool))
    out[r] = (tokens, jnp.repeat(keep, r * r, axis=1))
  return out


def from_config(config, **overrides) -> UNet:
  """The UNet `config.model.*` and `config.image_size` describe; overrides win (e.g. demo attn)."""
  m = config.model
  kw = dict(
      channels=m.channels, channel_mult=tuple(m.channel_mult), num_res_blocks=m.num_res_blocks,
      attention_resolutions=tuple(m.attention_resolutions),
      cross_attention_resolutions=tuple(m.cross_attention_resolutions), num_heads=m.num_heads,
      dropout=m.dropout, image_size=config.image_size, dtype=jnp.dtype(m.dtype))
  kw.update(overrides)
  return UNet(**kw)


def dummy_inputs(config, batch_size=1):
  """Zero inputs of the shapes `config` implies, for init / eval_shape."""
  te = config.model.text_encoder
  return (jnp.zeros((batch_size, config.image_size, config.image_size, 3), jnp.float32),
          jnp.zeros((batch_size,), jnp.int32),
          jnp.zeros((batch_size, te.max_length, te.width), jnp.float32),
          jnp.ones((batch_size, te.max_length), bool))


def param_shapes(config, **overrides):
  """The UNet's params as ShapeDtypeStructs, without allocating them (works for the 2B model)."""
  model = from_config(config, **overrides)
  return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), *dummy_inputs(config)))["params"]


def init_params(model: UNet, rng, config, **kwargs):
  """model's params for inputs shaped by `config`, under jit (eager init compiles op by op: ~5x
  slower on CPU). kwargs go to the model, e.g. extra_context to create demo-attention params."""
  init = jax.jit(lambda rng, *args: model.init(rng, *args, **kwargs)["params"])
  return init(rng, *dummy_inputs(config))
