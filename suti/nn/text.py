"""Text encoders behind one interface, selected by `model.text_encoder.kind`.

  'world': a word-level tokenizer over the embedded world's vocabulary and a small Transformer,
           trained jointly with the UNet (Imagen-style conditioning needs no pretrained model).
  'clip' / 't5': a frozen pretrained encoder (Imagen uses T5-XXL) read from a local Hugging Face
           directory (`model.text_encoder.path`); nothing is downloaded.

  encoder = make_text_encoder(config)
  ids, mask = encoder.tokenize(["a photo of a dog"])     # int32 [B, L], bool [B, L]
  params = encoder.init_params(rng)                       # trainable, or the pretrained weights
  tokens, mask = encoder.encode(params, ids, mask)        # [B, L, encoder.width], bool [B, L]
"""
from __future__ import annotations

import inspect
import re
from typing import Sequence

import flax.linen as nn
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from suti import hf_dir
from suti.nn import initializers as init

# ---------------------------------------------------------------------------------------------
# The world's encoder.


class WordTokenizer:
  """Lower-cased words -> ids: [<cls>, words..., <pad>...], with a mask over the real tokens.

  Words outside the vocabulary become <unk>; punctuation outside it is dropped. <cls> is always
  first, so even an empty prompt has one token to attend to.
  """
  PAD, UNK, CLS = 0, 1, 2
  SPECIALS = ("<pad>", "<unk>", "<cls>")

  def __init__(self, vocabulary: Sequence[str], max_length: int):
    if max_length < 1:
      raise ValueError(f"max_length must be >= 1, got {max_length}")
    words = dict.fromkeys(w.lower() for w in vocabulary if w.lower() not in self.SPECIALS)
    self.vocabulary = list(self.SPECIALS) + list(words)
    self.index = {w: i for i, w in enumerate(self.vocabulary)}
    self.max_length = max_length

  @property
  def vocab_size(self) -> int:
    return len(self.vocabulary)

  def words(self, text: str) -> list[str]:
    pieces = re.findall(r"\w+|[^\w\s]", text.lower())  # words and single punctuation marks
    return [p for p in pieces if p in self.index or re.match(r"\w", p)]

  def encode(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(texts, str):
      raise TypeError("encode takes a list of strings, got one string")
    ids = np.full((len(texts), self.max_length), self.PAD, np.int32)
    for row, text in enumerate(texts):
      seq = [self.CLS] + [self.index.get(w, self.UNK) for w in self.words(text)]
      seq = seq[:self.max_length]
      ids[row, :len(seq)] = seq
    return ids, ids != self.PAD

  def decode(self, ids) -> list[str]:
    """The words behind ids (specials dropped, <unk> kept): for logs and tests."""
    return [" ".join(self.vocabulary[i] for i in row if i not in (self.PAD, self.CLS))
            for row in np.asarray(ids)]


class TransformerTextEncoder(nn.Module):
  """Pre-LayerNorm bidirectional Transformer over word ids: [B, L] -> [B, L, width]."""
  vocab_size: int
  width: int = 64
  num_layers: int = 2
  num_heads: int = 4
  max_length: int = 16

  @nn.compact
  def __call__(self, ids, mask):
    x = nn.Embed(self.vocab_size, self.width, embedding_init=init.normal(0.02), name="embed")(ids)
    x = x + self.param("positions", init.normal(0.02), (self.max_length, self.width))[
        :ids.shape[1]]
    # Keys are masked, queries are not: padding rows get finite values the caller masks anyway.
    attn_mask = nn.make_attention_mask(jnp.ones_like(mask), mask)
    for i in range(self.num_layers):
      h = nn.LayerNorm(name=f"layers_{i}_norm1")(x)
      x = x + nn.MultiHeadDotProductAttention(
          self.num_heads, kernel_init=init.lecun_normal(), out_kernel_init=init.zeros,
          name=f"layers_{i}_attention")(h, h, mask=attn_mask)
      h = nn.LayerNorm(name=f"layers_{i}_norm2")(x)
      h = nn.Dense(4 * self.width, kernel_init=init.lecun_normal(), name=f"layers_{i}_mlp_0")(h)
      x = x + nn.Dense(self.width, kernel_init=init.zeros, name=f"layers_{i}_mlp_1")(nn.gelu(h))
    return nn.LayerNorm(name="final_norm")(x)


# ---------------------------------------------------------------------------------------------
# The common interface.


class TextEncoder:
  """tokenize(prompts) -> (ids, mask); init_params(rng); encode(params, ids, mask)."""
  kind: str
  width: int
  max_length: int
  trainable: bool

  def tokenize(self, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    raise NotImplementedError

  def init_params(self, rng):
    raise NotImplementedError

  def encode(self, params, ids, mask) -> tuple[jax.Array, jax.Array]:
    raise NotImplementedError

  def embed(self, params, prompts):
    """tokenize + encode, for callers that do not batch ids themselves."""
    return self.encode(params, *self.tokenize(prompts))


class WorldTextEncoder(TextEncoder):
  """The word tokenizer and a Transformer trained from scratch with the UNet, or (trainable
  False, `model.text_encoder.freeze`) kept at an initialisation from a fixed key: a function of
  the config alone, rebuilt by any process without a checkpoint, as a pretrained one is read."""
  kind = "world"
  FROZEN_KEY = 0

  def __init__(self, vocabulary, width, num_layers, num_heads, max_length, trainable=True):
    self.trainable = trainable
    self.tokenizer = WordTokenizer(vocabulary, max_length)
    self.width, self.max_length = width, max_length
    self.module = TransformerTextEncoder(self.tokenizer.vocab_size, width, num_layers, num_heads,
                                         max_length)

  def tokenize(self, prompts):
    return self.tokenizer.encode(prompts)

  def init_params(self, rng):
    if not self.trainable:  # the same weights whatever the run's seed
      rng = jax.random.PRNGKey(self.FROZEN_KEY)
    ids = jnp.zeros((1, self.max_length), jnp.int32)
    return jax.jit(self.module.init)(rng, ids, ids == 0)["params"]

  def encode(self, params, ids, mask):
    mask = jnp.asarray(mask, bool)
    return self.module.apply({"params": params}, jnp.asarray(ids, jnp.int32), mask), mask


# ---------------------------------------------------------------------------------------------
# Frozen pretrained encoders from a local Hugging Face directory.

_TOKENIZER_FILES = {  # any one of these sets is enough
    "clip": (("tokenizer.json",), ("vocab.json", "merges.txt")),
    "t5": (("tokenizer.json",), ("spiece.model",)),
}


class _JnpWithClipAliases:
  """jax.numpy, except that clip() also takes a_min / a_max, which jax 0.10 removed."""

  def __getattr__(self, name):
    return getattr(jnp, name)

  @staticmethod
  def clip(x, min=None, max=None, *, a_min=None, a_max=None):  # pylint: disable=redefined-builtin
    return jnp.clip(x, a_min if min is None else min, a_max if max is None else max)


def patch_flax_t5():
  """Lets transformers' FlaxT5 run on jax >= 0.10.

  FlaxT5Attention._relative_position_bucket calls `jnp.clip(..., a_max=...)`; jax 0.10 renamed
  the keyword to `max`, so any T5 forward (and even building a random T5) raises TypeError. The
  shim swaps the `jnp` global of transformers' modeling_flax_t5 module only, for a proxy whose
  clip() accepts both spellings; jax.numpy itself and every other module are untouched.
  Idempotent, and a no-op on a jax whose clip() still takes a_max.
  """
  from transformers.models.t5 import modeling_flax_t5  # pylint: disable=import-outside-toplevel
  if "a_max" in inspect.signature(jnp.clip).parameters:
    return
  if not isinstance(modeling_flax_t5.jnp, _JnpWithClipAliases):
    modeling_flax_t5.jnp = _JnpWithClipAliases()


def check_pretrained_dir(kind: str, path: str):
  """Raises FileNotFoundError naming the directory and what is missing from it."""
  if kind not in _TOKENIZER_FILES:
    raise ValueError(f"kind must be one of {', '.join(_TOKENIZER_FILES)}, got {kind!r}")
  if not path:
    raise ValueError(f"model.text_encoder.path must name a local Hugging Face directory when "
                     f"model.text_encoder.kind={kind!r}")
  hf_dir.check_model_dir(path, f"{kind} text encoder")
  has = lambda name: hf_dir.has_file(path, name)
  options = _TOKENIZER_FILES[kind]
  if not any(all(map(has, files)) for files in options):
    wanted = " or ".join(" + ".join(files) for files in options)
    raise FileNotFoundError(f"{kind} text encoder directory {path!r} has no tokenizer files: "
                            f"expected {wanted}")


class PretrainedTextEncoder(TextEncoder):
  """A frozen Hugging Face Flax encoder: CLIP text (FlaxCLIPTextModel) or T5 (FlaxT5EncoderModel).

  Tokens are the last hidden states (Imagen conditions on T5's, Stable Diffusion on CLIP's).
  """
  trainable = False

  def __init__(self, kind: str, path: str, max_length: int):
    # pylint: disable=import-outside-toplevel
    import transformers
    check_pretrained_dir(kind, path)
    if kind == "t5":
      patch_flax_t5()
      model_class = transformers.FlaxT5EncoderModel
    else:
      model_class = transformers.FlaxCLIPTextModel
    # _do_init=False: no random init of a model whose weights are about to be replaced (T5-XXL is
    # 4.7B parameters); a full CLIP / T5 checkpoint loads too, its other towers dropped.
    self.model, self._params = model_class.from_pretrained(path, _do_init=False)
    missing = (set(traverse_util.flatten_dict(self.model.params_shape_tree))
               - set(traverse_util.flatten_dict(self._params)))
    if missing:
      raise ValueError(f"{kind} checkpoint in {path!r} lacks weights the encoder needs: "
                       f"{sorted('/'.join(k) for k in missing)[:5]}")
    try:
      self.tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    except Exception as e:  # pylint: disable=broad-except
      raise OSError(f"could not load the {kind} tokenizer from {path!r}: {e} (a tokenizer.json "
                    f"needs no extra packages; spiece.model needs sentencepiece)") from e
    config = self.model.config
    self.kind, self.path, self.max_length = kind, path, max_length
    self.width = config.hidden_size if kind == "clip" else config.d_model
    positions = getattr(config, "max_position_embeddings", None)
    if positions is not None and max_length > positions:
      raise ValueError(f"model.text_encoder.max_length={max_length} exceeds the {kind} model's "
                       f"max_position_embeddings={positions} ({path!r})")

  def tokenize(self, prompts):
    if isinstance(prompts, str):
      raise TypeError("tokenize takes a list of strings, got one string")
    out = self.tokenizer(list(prompts), padding="max_length", truncation=True,
                         max_length=self.max_length, return_tensors="np")
    return out["input_ids"].astype(np.int32), out["attention_mask"].astype(bool)

  def init_params(self, rng=None):
    del rng  # pretrained: nothing random
    return jax.tree_util.tree_map(jnp.asarray, self._params)

  def encode(self, params, ids, mask):
    mask = jnp.asarray(mask, bool)
    out = self.model(jnp.asarray(ids, jnp.int32), attention_mask=mask.astype(jnp.int32),
                     params=jax.lax.stop_gradient(params), train=False)  # frozen
    return out.last_hidden_state, mask


def make_text_encoder(config, vocabulary: Sequence[str] | None = None) -> TextEncoder:
  """The encoder `config.model.text_encoder` describes.

  vocabulary: the world's words (kind 'world'); defaults to `suti.data.world.vocabulary()`.
  """
  te = config.model.text_encoder
  if te.kind == "world":
    if vocabulary is None:
      from suti.data import world  # pylint: disable=import-outside-toplevel
      vocabulary = world.vocabulary()
    return WorldTextEncoder(vocabulary, te.width, te.num_layers, te.num_heads, te.max_length,
                            trainable=not te.get("freeze", False))  # absent: saved before it
  if te.kind in ("clip", "t5"):
    encoder = PretrainedTextEncoder(te.kind, te.path, te.max_length)
    if encoder.width != te.width:
      # The UNet's text projection is sized from this key; a mismatch would fail much later.
      raise ValueError(f"model.text_encoder.width={te.width} but the {te.kind} model in "
                       f"{te.path!r} outputs width {encoder.width}; set "
                       f"--config.model.text_encoder.width={encoder.width}")
    return encoder
  raise ValueError(f"model.text_encoder.kind must be one of world, clip, t5, got {te.kind!r}")
