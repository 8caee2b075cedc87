"""Text encoders: the world's word tokenizer + Transformer, and frozen CLIP / T5 loaded from tiny
random Hugging Face checkpoints written here (nothing is downloaded)."""
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from flax import traverse_util
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers.models.clip.tokenization_clip import bytes_to_unicode

from suti import config_lib
from suti.nn import text

WORDS = ["a", "photo", "of", "dog", "cat", "on", "the", "grass", "red", "ball", "beach"]


def make_config(kind="world", path="", width=32, max_length=8):
  config = config_lib.base_config()
  te = config.model.text_encoder
  te.kind, te.path, te.width, te.max_length = kind, str(path), width, max_length
  te.num_layers, te.num_heads = 1, 2
  return config


def random_params(model, seed=0):
  """Random weights for a model built with _do_init=False, drawn with numpy (fast on CPU)."""
  rng = np.random.default_rng(seed)
  flat = traverse_util.flatten_dict(model.params_shape_tree)
  return traverse_util.unflatten_dict({
      k: (0.2 * rng.standard_normal(v.shape)).astype(v.dtype) for k, v in flat.items()})


# -- World ------------------------------------------------------------------------------------

def test_word_tokenizer():
  tok = text.WordTokenizer(WORDS + ["Dog", "<pad>"], max_length=6)
  assert tok.vocab_size == 3 + len(WORDS)  # duplicates and specials are not added twice
  ids, mask = tok.encode(["A photo of a DOG.", "a zebra on grass", "", "a a a a a a a a"])
  assert ids.dtype == np.int32 and mask.dtype == bool and ids.shape == (4, 6)
  assert (ids[:, 0] == tok.CLS).all()
  assert tok.decode(ids[:1]) == ["a photo of a dog"]  # lower-cased, '.' dropped
  assert ids[1, 2] == tok.UNK and tok.decode(ids[1:2]) == ["a <unk> on grass"]
  np.testing.assert_array_equal(mask.sum(1), [6, 5, 1, 6])  # truncated to max_length
  assert (ids[~mask] == tok.PAD).all()
  with pytest.raises(TypeError):
    tok.encode("a dog")


@pytest.fixture(scope="module")
def world():
  encoder = text.make_text_encoder(make_config(), vocabulary=WORDS)
  params = encoder.init_params(jax.random.PRNGKey(0))
  return encoder, params, jax.jit(encoder.encode)


def test_world_encoder(world):
  encoder, params, encode = world
  assert encoder.trainable and encoder.width == 32 and encoder.kind == "world"
  ids, mask = encoder.tokenize(["a red ball on the beach", "a dog", "a cat"])
  tokens, out_mask = encode(params, ids, mask)
  assert tokens.shape == (3, 8, 32) and tokens.dtype == jnp.float32
  np.testing.assert_array_equal(out_mask, mask)
  assert np.abs(tokens[1, 2] - tokens[2, 2]).max() > 1e-3  # 'dog' vs 'cat'
  # Fresh residual branches are zero (no mixing yet); perturbed ones let context flow: the
  # <cls> and 'a' tokens see 'dog' vs 'cat' ...
  rng = np.random.default_rng(0)
  params = jax.tree_util.tree_map(
      lambda x: x + 0.2 * rng.standard_normal(x.shape).astype(np.float32), params)
  tokens = encode(params, ids, mask)[0]
  assert np.abs(tokens[1, :2] - tokens[2, :2]).max() > 1e-3
  # ... but not padding: other ids under the mask leave the real tokens unchanged.
  noisy = np.where(mask, ids, 5)
  np.testing.assert_allclose(encode(params, noisy, mask)[0][mask], tokens[mask], atol=1e-5)


def test_world_encoder_is_trainable(world):
  encoder, params, _ = world
  ids, mask = encoder.tokenize(["a dog on the grass"])
  grads = jax.jit(jax.grad(lambda p: encoder.encode(p, ids, mask)[0].sum()))(params)
  assert any(np.abs(g).max() > 0 for g in jax.tree_util.tree_leaves(grads))


# -- Hugging Face checkpoints -----------------------------------------------------------------

def write_clip_tokenizer(path):
  # Byte-level BPE: every byte symbol, with and without the end-of-word mark, plus two merges.
  chars = list(bytes_to_unicode().values())
  merges = [("d", "o"), ("do", "g</w>"), ("c", "a"), ("ca", "t</w>")]
  vocab = (chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges]
           + ["<|startoftext|>", "<|endoftext|>"])
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, "vocab.json"), "w") as f:
    json.dump({t: i for i, t in enumerate(vocab)}, f)
  with open(os.path.join(path, "merges.txt"), "w") as f:
    f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
  tokenizer = transformers.CLIPTokenizer(os.path.join(path, "vocab.json"),
                                         os.path.join(path, "merges.txt"))
  tokenizer.save_pretrained(path)
  return len(vocab)


def write_t5_tokenizer(path):
  # A unigram (sentencepiece-style) tokenizer.json: T5TokenizerFast reads it without
  # sentencepiece, which is not installed.
  pieces = ([("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [("▁" + w, -1.0) for w in WORDS]
            + [(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz"] + [("▁", -2.0)])
  tok = Tokenizer(models.Unigram(pieces, unk_id=2))
  tok.pre_tokenizer = pre_tokenizers.Metaspace()
  tok.decoder = decoders.Metaspace()
  tok.post_processor = processors.TemplateProcessing(
      single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)])
  transformers.T5TokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                               unk_token="<unk>", extra_ids=0).save_pretrained(path)
  return len(pieces)


def clip_text_config(vocab_size):
  return transformers.CLIPTextConfig(
      vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
      num_attention_heads=4, max_position_embeddings=16, bos_token_id=vocab_size - 2,
      eos_token_id=vocab_size - 1)


def t5_config(vocab_size):
  return transformers.T5Config(vocab_size=vocab_size, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                               num_decoder_layers=1, num_heads=4)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp("clip")
  vocab_size = write_clip_tokenizer(path)
  model = transformers.FlaxCLIPTextModel(clip_text_config(vocab_size), _do_init=False)
  model.save_pretrained(path, params=random_params(model))
  return path


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory):
  text.patch_flax_t5()  # building even a random FlaxT5 traces the code the shim fixes
  path = tmp_path_factory.mktemp("t5")
  vocab_size = write_t5_tokenizer(path)
  model = transformers.FlaxT5EncoderModel(t5_config(vocab_size), _do_init=False)
  model.save_pretrained(path, params=random_params(model))
  return path


PROMPTS = ["a dog on the grass", "a cat"]


@pytest.mark.parametrize("kind", ["clip", "t5"])
def test_pretrained_encoder_matches_hugging_face(kind, clip_dir, t5_dir):
  path = clip_dir if kind == "clip" else t5_dir
  encoder = text.make_text_encoder(make_config(kind, path))
  assert not encoder.trainable and encoder.width == 32 and encoder.kind == kind
  ids, mask = encoder.tokenize(PROMPTS)
  assert ids.shape == mask.shape == (2, 8) and ids.dtype == np.int32 and mask.dtype == bool
  expected = transformers.AutoTokenizer.from_pretrained(path)(
      PROMPTS, padding="max_length", truncation=True, max_length=8, return_tensors="np")
  np.testing.assert_array_equal(ids, expected["input_ids"])
  np.testing.assert_array_equal(mask, expected["attention_mask"] == 1)

  params = encoder.init_params(jax.random.PRNGKey(0))
  tokens, out_mask = jax.jit(encoder.encode)(params, ids, mask)
  assert tokens.shape == (2, 8, 32)
  np.testing.assert_array_equal(out_mask, mask)
  model_class = {"clip": transformers.FlaxCLIPTextModel, "t5": transformers.FlaxT5EncoderModel}
  model, hf_params = model_class[kind].from_pretrained(path, _do_init=False)
  direct = jax.jit(lambda p: model(ids, attention_mask=mask.astype(np.int32), params=p)
                   .last_hidden_state)(hf_params)
  np.testing.assert_allclose(tokens, direct, rtol=1e-5, atol=1e-5)
  # Frozen: no gradient reaches the pretrained weights.
  grads = jax.jit(jax.grad(lambda p: encoder.encode(p, ids, mask)[0].sum()))(params)
  assert all(np.abs(g).max() == 0 for g in jax.tree_util.tree_leaves(grads))


def test_full_clip_checkpoint_loads_as_text_encoder(tmp_path, clip_dir):
  # A real CLIP directory (e.g. openai/clip-vit-large-patch14) holds both towers.
  for name in ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"):
    shutil.copy(clip_dir / name, tmp_path / name)
  vocab_size = len(json.loads((clip_dir / "vocab.json").read_text()))
  vision = transformers.CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, image_size=8, patch_size=4)
  config = transformers.CLIPConfig(text_config=clip_text_config(vocab_size).to_dict(),
                                   vision_config=vision.to_dict(), projection_dim=8)
  model = transformers.FlaxCLIPModel(config, _do_init=False)
  params = random_params(model)
  model.save_pretrained(tmp_path, params=params)
  encoder = text.make_text_encoder(make_config("clip", tmp_path))
  loaded = encoder.init_params(None)
  jax.tree_util.tree_map(np.testing.assert_array_equal, loaded, {"text_model": params["text_model"]})


def test_full_t5_checkpoint_loads_as_encoder(tmp_path, t5_dir):
  # Imagen's T5-XXL ships as a whole encoder-decoder; only the encoder (and `shared`) is kept.
  for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
    shutil.copy(t5_dir / name, tmp_path / name)
  vocab_size = transformers.AutoConfig.from_pretrained(t5_dir).vocab_size
  model = transformers.FlaxT5ForConditionalGeneration(t5_config(vocab_size), _do_init=False)
  params = random_params(model)
  model.save_pretrained(tmp_path, params=params)
  loaded = text.make_text_encoder(make_config("t5", tmp_path)).init_params(None)
  assert set(loaded) == {"shared", "encoder"}
  jax.tree_util.tree_map(np.testing.assert_array_equal, loaded["encoder"], params["encoder"])


def test_t5_shim_is_scoped_to_flax_t5():
  from transformers.models.t5 import modeling_flax_t5
  text.patch_flax_t5()
  text.patch_flax_t5()  # idempotent
  x = jnp.arange(-3.0, 4.0)
  shim = modeling_flax_t5.jnp
  np.testing.assert_array_equal(shim.clip(x, a_max=1.0), jnp.clip(x, max=1.0))
  np.testing.assert_array_equal(shim.clip(x, a_min=-1.0, a_max=1.0), jnp.clip(x, -1.0, 1.0))
  assert shim.float32 is jnp.float32  # everything else is jax.numpy
  assert jax.numpy.clip is jnp.clip and transformers.modeling_flax_utils.jnp is jnp


def test_missing_files_are_named(tmp_path, clip_dir):
  path = tmp_path / "clip"
  shutil.copytree(clip_dir, path)
  config = make_config("clip", path)
  for name in ("merges.txt", "flax_model.msgpack", "config.json"):
    (path / name).rename(path / (name + ".away"))
    with pytest.raises(FileNotFoundError, match=f"{path}.*{name}"):
      text.make_text_encoder(config)
  (path / "pytorch_model.bin").write_bytes(b"")
  with pytest.raises(FileNotFoundError, match="needs torch"):
    (path / "config.json.away").rename(path / "config.json")
    text.make_text_encoder(config)
  with pytest.raises(FileNotFoundError, match="does not exist"):
    text.make_text_encoder(make_config("t5", tmp_path / "nowhere"))
  with pytest.raises(ValueError, match="model.text_encoder.path"):
    text.make_text_encoder(make_config("t5", ""))


def test_width_mismatch_names_the_key(clip_dir):
  with pytest.raises(ValueError, match="model.text_encoder.width=64"):
    text.make_text_encoder(make_config("clip", clip_dir, width=64))
