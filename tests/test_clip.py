"""CLIP scoring (suti.clip) and the world CLIP (suti.clip_train), on tiny local checkpoints."""
import json
import os
import shutil

from flax import traverse_util
import jax
import numpy as np
import pytest
import transformers

from suti import clip as clip_lib
from suti import clip_train
from suti.data import builder
from suti.data import pipeline
from suti.data import world as world_lib
from tests.conftest import load_config

PROMPTS = ["a star on the grass", "a red cup wearing a hat", "a sketch of a kite at night",
           "a ball"]


def tiny_clip_config(vocab, image_size=8):
  common = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                projection_dim=8)
  text = transformers.CLIPTextConfig(
      vocab_size=len(vocab), max_position_embeddings=16, bos_token_id=vocab["<|startoftext|>"],
      eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["<|endoftext|>"], **common)
  vision = transformers.CLIPVisionConfig(image_size=image_size, patch_size=4, **common)
  return transformers.CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(),
                                 projection_dim=8)


def random_params(model, seed=0):
  """Every leaf random (norm scales near 1), so a transposed or misnamed weight shows."""
  rng = np.random.default_rng(seed)
  flat = traverse_util.flatten_dict(model.params_shape_tree)
  out = {}
  for key, leaf in flat.items():
    x = rng.normal(0.0, 0.2, leaf.shape).astype(np.float32)
    out[key] = x + 1.0 if key[-1] == "scale" else x
  return traverse_util.unflatten_dict(out)


def to_pytorch_layout(params) -> dict:
  """Flax CLIP params -> the PyTorch CLIPModel state dict, as numpy (the inverse of
  transformers' pt->flax renaming): Dense kernels transposed, the patch conv to OIHW, norm
  scales and embedding tables named 'weight'."""
  state = {}
  for key, x in traverse_util.flatten_dict(params).items():
    x, name = np.asarray(x), key[-1]
    if name == "kernel":
      x = x.transpose(3, 2, 0, 1) if x.ndim == 4 else x.T
      name = "weight"
    elif name in ("scale", "embedding"):
      name = "weight"
    state[".".join(key[:-1] + (name,))] = np.array(x, order="C")  # (keeps 0-d logit_scale)
  # A buffer old PyTorch checkpoints carry; it has no Flax counterpart.
  state["text_model.embeddings.position_ids"] = np.arange(16, dtype=np.int64)[None]
  return state


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp("clip_flax")
  tokenizer = clip_train.save_world_tokenizer(path)
  model = transformers.FlaxCLIPModel(tiny_clip_config(tokenizer.get_vocab()), _do_init=False)
  model.save_pretrained(path, params=random_params(model))
  return path


@pytest.fixture(scope="module")
def scorer(clip_dir):
  return clip_lib.ClipScorer.from_pretrained(clip_dir, batch_size=4)


def images(n, size=8, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def direct_embeddings(path, pixels_uint8, prompts):
  """FlaxCLIPModel called as its documentation does, with CLIP's normalization by hand."""
  model, params = transformers.FlaxCLIPModel.from_pretrained(path, _do_init=False)
  tokenizer = transformers.AutoTokenizer.from_pretrained(path)
  x = (pixels_uint8 / 255.0 - np.array(clip_lib.OPENAI_CLIP_MEAN)) / np.array(
      clip_lib.OPENAI_CLIP_STD)
  # Jitted: eager Flax compiles every op on its own, which takes longer on CPU.
  image = jax.jit(lambda p, x: model.get_image_features(x, params=p))(
      params, x.transpose(0, 3, 1, 2).astype(np.float32))
  tokens = tokenizer(prompts, padding="max_length", max_length=16, return_tensors="np")
  text = jax.jit(lambda p, i, m: model.get_text_features(i, m, params=p))(
      params, tokens["input_ids"], tokens["attention_mask"])
  unit = lambda e: np.asarray(e) / np.linalg.norm(e, axis=-1, keepdims=True)
  return unit(image), unit(text)


# -- Loading and embeddings ---------------------------------------------------------------------

def test_scorer_matches_flax_clip(clip_dir, scorer):
  assert (scorer.image_size, scorer.embed_dim, scorer.max_length) == (8, 8, 16)
  x = images(6)  # 6 with batch_size 4: a padded last batch
  want_image, want_text = direct_embeddings(clip_dir, x, PROMPTS)
  got_image, got_text = scorer.embed_images(x), scorer.embed_texts(PROMPTS)
  assert got_image.shape == (6, 8) and got_text.shape == (4, 8)
  np.testing.assert_allclose(got_image, want_image, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(got_text, want_text, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(np.linalg.norm(got_image, axis=-1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(scorer.score(x[:4], PROMPTS),
                             np.sum(want_image[:4] * want_text, -1), rtol=1e-4, atol=1e-5)


def test_batches_pad_without_recompiling(scorer):
  x = images(7, seed=1)
  alone = np.concatenate([scorer.embed_images(x[i:i + 1]) for i in range(7)])
  np.testing.assert_allclose(scorer.embed_images(x), alone, rtol=1e-5, atol=1e-6)
  assert scorer.embed_images(x[:0]).shape == (0, 8)
  scorer.embed_images(images(3))
  assert scorer._image_fn._cache_size() == 1  # pylint: disable=protected-access


def test_resizes_like_clip_image_processor():
  # Any size: short side resized to the model's, centre crop, as Hugging Face's processor
  # (which rounds the resized image to uint8: differences stay within one uint8 step, 0.015).
  processor = transformers.CLIPImageProcessor(size={"shortest_edge": 8},
                                              crop_size={"height": 8, "width": 8})
  for shape in ((24, 20), (20, 24), (24, 24), (8, 30)):
    x = np.random.default_rng(2).integers(0, 256, (2, *shape, 3), dtype=np.uint8)
    want = processor(list(x), return_tensors="np")["pixel_values"]
    got = np.asarray(clip_lib.preprocess(x, 8))
    assert got.shape == want.shape == (2, 3, 8, 8)
    assert np.abs(got - want).max() < 0.02, shape


def test_model_space_images(scorer):
  x = images(3, seed=3)
  float_images = x.astype(np.float32) / 127.5 - 1.0
  np.testing.assert_allclose(scorer.embed_images(float_images, model_space=True),
                             scorer.embed_images(x), rtol=1e-4, atol=1e-5)


def test_pytorch_safetensors_loads_without_torch(clip_dir, scorer, tmp_path):
  from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel
  for name in os.listdir(clip_dir):
    if name != "flax_model.msgpack":
      shutil.copy(clip_dir / name, tmp_path / name)
  params = transformers.FlaxCLIPModel.from_pretrained(clip_dir, _do_init=False)[1]
  state = to_pytorch_layout(params)
  # PyTorch's layouts: Linear [out, in], Conv2d [out, in, kh, kw], LayerNorm 'weight'.
  assert state["vision_model.embeddings.patch_embedding.weight"].shape == (16, 3, 4, 4)
  assert state["visual_projection.weight"].shape == (8, 16)
  assert state["text_model.encoder.layers.0.mlp.fc1.weight"].shape == (32, 16)
  assert "vision_model.pre_layrnorm.weight" in state and state["logit_scale"].shape == ()
  save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
  loaded = clip_lib.ClipScorer.from_pretrained(tmp_path, batch_size=4)
  jax.tree_util.tree_map(np.testing.assert_array_equal, loaded.params, params)
  x = images(5, seed=4)
  np.testing.assert_allclose(loaded.embed_images(x), scorer.embed_images(x), atol=1e-6)
  np.testing.assert_allclose(loaded.embed_texts(PROMPTS), scorer.embed_texts(PROMPTS),
                             atol=1e-6)


# -- delta-CLIP ---------------------------------------------------------------------------------

def test_delta_clip_exact_numbers_and_mask():
  text = np.array([[1.0, 0.0], [0.0, 1.0]])
  target = np.array([[0.6, 0.8], [0.6, 0.8]])
  demos = np.array([[[0.0, 1.0], [0.8, 0.6], [1.0, 0.0]],    # last one is padding
                    [[1.0, 0.0], [0.28, 0.96], [0.6, 0.8]]])
  mask = np.array([[True, True, False], [True, True, True]])
  out = jax.device_get(clip_lib.delta_clip(target, demos, text, mask))
  np.testing.assert_allclose(out["clip_target"], [0.6, 0.8], atol=1e-6)
  np.testing.assert_allclose(out["clip_demos_max"], [0.8, 0.96], atol=1e-6)
  np.testing.assert_allclose(out["delta"], [-0.2, -0.16], atol=1e-6)
  # Unmasked, the padding row (cosine 1.0) would win for the first triple.
  np.testing.assert_allclose(clip_lib.delta_clip(target, demos, text)["delta"], [-0.4, -0.16],
                             atol=1e-6)
  # Scale does not matter: cosines.
  np.testing.assert_allclose(clip_lib.delta_clip(3 * target, 2 * demos, text, mask)["delta"],
                             out["delta"], atol=1e-6)
  none = clip_lib.delta_clip(target, demos, text, np.zeros((2, 3), bool))
  assert np.all(np.isneginf(none["clip_demos_max"])) and np.all(np.isposinf(none["delta"]))


def test_delta_clip_vectorizes():
  rng = np.random.default_rng(0)
  target, text = rng.normal(size=(9, 5)), rng.normal(size=(9, 5))
  demos, mask = rng.normal(size=(9, 4, 5)), rng.random((9, 4)) < 0.7
  mask[:, 0] = True
  batched = clip_lib.delta_clip(target, demos, text, mask)["delta"]
  for i in range(9):
    one = clip_lib.delta_clip(target[i:i + 1], demos[i:i + 1, mask[i]], text[i:i + 1])
    np.testing.assert_allclose(batched[i], one["delta"][0], rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="demo_emb"):
    clip_lib.delta_clip(target, demos[:, :, :3], text)
  with pytest.raises(ValueError, match="demo_mask"):
    clip_lib.delta_clip(target, demos, text, mask[:, :2])


def test_scorer_delta_matches_embeddings(scorer):
  targets = images(3, seed=5)
  demos = [images(2, seed=6), images(4, seed=7), images(1, seed=8)]
  out = scorer.delta(targets, demos, PROMPTS[:3])
  text = scorer.embed_texts(PROMPTS[:3])
  for i in range(3):
    clip_target = scorer.embed_images(targets[i:i + 1])[0] @ text[i]
    demos_max = np.max(scorer.embed_images(demos[i]) @ text[i])
    np.testing.assert_allclose(out["clip_target"][i], clip_target, atol=1e-5)
    np.testing.assert_allclose(out["delta"][i], clip_target - demos_max, atol=1e-5)


# -- Bad inputs ---------------------------------------------------------------------------------

def test_bad_inputs_are_named(scorer):
  with pytest.raises(ValueError, match=r"prompts\[1\] is empty"):
    scorer.embed_texts(["a star", "  "])
  with pytest.raises(TypeError, match="one string"):
    scorer.embed_texts("a star")
  with pytest.raises(ValueError, match=r"\[N, H, W, 3\].*\(8, 8, 3\)"):
    scorer.embed_images(images(1)[0])
  with pytest.raises(ValueError, match=r"\(2, 8, 8, 4\)"):
    scorer.embed_images(np.zeros((2, 8, 8, 4), np.uint8))
  with pytest.raises(TypeError, match="uint8.*float32.*model_space"):
    scorer.embed_images(np.zeros((2, 8, 8, 3), np.float32))
  with pytest.raises(ValueError, match=r"\[-1, 1\]"):
    scorer.embed_images(np.full((2, 8, 8, 3), 200.0, np.float32), model_space=True)
  with pytest.raises(ValueError, match="2 images, 1 prompts"):
    scorer.score(images(2), ["a star"])
  with pytest.raises(ValueError, match=r"demos_list\[0\] is empty"):
    scorer.delta(images(1), [images(0)], ["a star"])


def test_missing_files_are_named(clip_dir, tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    clip_lib.ClipScorer.from_pretrained(tmp_path / "nowhere")
  for name in os.listdir(clip_dir):
    shutil.copy(clip_dir / name, tmp_path / name)
  for name, message in (("merges.txt", "merges.txt"), ("flax_model.msgpack", "flax_model"),
                        ("config.json", "config.json")):
    os.remove(tmp_path / name)
    with pytest.raises(FileNotFoundError, match=message) as error:
      clip_lib.ClipScorer.from_pretrained(tmp_path)
    assert str(tmp_path) in str(error.value)


# -- The world CLIP -----------------------------------------------------------------------------

def test_world_tokenizer_makes_each_word_one_token(tmp_path):
  slow = clip_train.save_world_tokenizer(tmp_path)
  fast = transformers.AutoTokenizer.from_pretrained(tmp_path)  # what ClipScorer loads
  vocab = slow.get_vocab()
  assert max(vocab.values()) == vocab["<|endoftext|>"]  # CLIP pools at the highest id
  for word in world_lib.vocabulary():
    assert slow.tokenize(word) == [word + "</w>"], word
  rng = np.random.default_rng(0)
  sentences = [world_lib.format_prompt(str(rng.choice(world_lib.CATEGORIES)),
                                       world_lib.random_scene(rng)) for _ in range(200)]
  sentences += clip_train._longest_prompts()  # pylint: disable=protected-access
  for sentence in sentences:
    ids = slow(sentence)["input_ids"]
    assert len(ids) == len(sentence.split()) + 2 <= 16, sentence
    assert fast(sentence)["input_ids"] == ids
  # Words outside the world fall back to bytes instead of failing.
  assert slow.tokenize("zebra") == ["z", "e", "b", "r", "a</w>"]


def test_contrastive_loss_does_not_punish_duplicate_captions():
  # Pairs 0 and 1 share a caption and look alike; pair 2 is different.
  ids = np.array([[5, 6, 7], [5, 6, 7], [5, 8, 7]])
  text = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
  loss_fn = jax.jit(clip_train.contrastive_loss)
  loss, accuracy = loss_fn(text, text, ids, np.log(100.0))
  assert float(loss) < 1e-6 and float(accuracy) == 1.0
  unmasked, _ = loss_fn(text, text, np.arange(9).reshape(3, 3), np.log(100.0))
  assert float(unmasked) > 0.4  # ~ (2/3) log 2: the twin counted as a negative


def test_identity_loss_asks_for_the_subject_not_the_scene():
  # Two records. Embedding axes: subjects 0-3, then scenes x and y.
  def emb(subject, scene):
    x = np.zeros(6)
    x[subject], x[4 + scene] = 1.0, 1.0
    return x
  anchor = np.stack([emb(0, 0), emb(2, 0)])
  positive = np.stack([emb(0, 1), emb(2, 1)])  # own subject, another scene
  twin = np.stack([emb(1, 1), emb(3, 1)])      # another subject, the positive's scene
  loss_fn = jax.jit(clip_train.identity_loss)
  loss, accuracy = loss_fn(anchor, positive, twin)
  assert float(accuracy) == 1.0
  # Each anchor: cosine 0.5 to its positive (the subject), 0 to the three others.
  logits = np.array([0.5, 0.0, 0.0, 0.0]) / clip_train.IDENTITY_TEMPERATURE
  expected = -(logits[0] - np.log(np.exp(logits).sum()))
  assert float(loss) == pytest.approx(expected, rel=1e-5)
  # An embedding of the scene alone cannot tell the positive from the twin.
  scene_only = [x * (np.arange(6) >= 4) for x in (anchor, positive, twin)]
  loss_scene, accuracy_scene = loss_fn(*scene_only)
  assert float(loss_scene) == pytest.approx(np.log(4), rel=1e-5)
  assert float(accuracy_scene) <= 0.5


def test_identity_views_show_one_subject_in_two_scenes_and_a_twin(tmp_path):
  config = load_config("tiny")
  world = world_lib.from_config(config)
  pool = world.train_pool(64)
  tokenizer = clip_train.save_world_tokenizer(tmp_path)
  record = {"image": np.zeros((config.image_size,) * 2 + (3,), np.uint8),
            "caption": "a star on the grass"}
  plain = clip_train.make_transform(tokenizer, 16, world, pool)
  transform = clip_train.make_transform(tokenizer, 16, world, pool, identity_views=True)
  assert plain(record, np.random.default_rng(0))["image"].shape[0] == 4
  for seed in range(8):
    out = transform(record, np.random.default_rng(seed))
    assert out["image"].shape[0] == 4 + clip_train.IDENTITY_VIEWS == out["ids"].shape[0]
    captions = [tokenizer.decode(ids, skip_special_tokens=True).strip()
                for ids in out["ids"][-3:]]
    scenes = [world.parse_prompt(c) for c in captions]
    # A, A, then C: one category, so the captions cannot tell A from C.
    assert len({world_lib.parse(c)[0] for c in captions}) == 1
    assert all(s.color is None and s.style is None for s in scenes)
    assert captions[1] == captions[2]  # C in A's second scene, same layout...
    positive, twin = out["image"][-2].astype(int), out["image"][-1].astype(int)
    assert np.abs(positive - twin).sum() > 0  # ...yet another subject's pixels
    for image in (positive, twin):  # on a masked background
      assert (image == clip_train._MASK_FILL).all(-1).mean() > 0.2  # pylint: disable=protected-access
  # One subject of each category: no twin to draw.
  one_each = [next(s for s in pool if s.category == c) for c in ("star", "ball")]
  with pytest.raises(ValueError, match="two subjects of category"):
    clip_train.make_transform(tokenizer, 16, world, one_each, identity_views=True)(
        record, np.random.default_rng(0))


def test_identity_term_trains_on_its_views_and_leaves_the_text_contrast_alone(tmp_path):
  config = load_config("tiny")
  world = world_lib.from_config(config)
  tokenizer = clip_train.save_world_tokenizer(tmp_path)
  vocab = tokenizer.get_vocab()
  model = transformers.FlaxCLIPModel(
      clip_train.world_clip_config(config, len(vocab), vocab["<|startoftext|>"],
                                   vocab["<|endoftext|>"]), _do_init=False)
  transform = clip_train.make_transform(tokenizer, config.clip.max_length, world,
                                        world.train_pool(64), identity_views=True)
  record = {"image": np.zeros((config.image_size,) * 2 + (3,), np.uint8),
            "caption": "a star on the grass"}
  groups = [transform(record, np.random.default_rng(seed)) for seed in range(6)]
  batch = {k: np.stack([g[k] for g in groups]) for k in groups[0]}  # [6 records, 7, ...]
  size, mean, std = config.image_size, clip_lib.OPENAI_CLIP_MEAN, clip_lib.OPENAI_CLIP_STD
  tx = clip_train.make_optimizer(3e-3, 40)
  params = clip_train.init_params(model, 0)
  with_identity = jax.jit(clip_train.make_train_step(model, tx, size, mean, std, 1.0))
  text_only = jax.jit(clip_train.make_train_step(model, tx, size, mean, std))
  opt_state = tx.init(params)
  # The text contrast sees the first four pairs of a group only.
  _, _, first = with_identity(params, opt_state, batch)
  _, _, plain = text_only(params, opt_state, {k: v[:, :4] for k, v in batch.items()})
  assert float(first["text_loss"]) == pytest.approx(float(plain["loss"]), rel=1e-5)
  assert float(first["loss"]) == pytest.approx(
      float(first["text_loss"]) + float(first["identity_loss"]), rel=1e-5)
  # Its gradient reaches the image tower: fitting one batch, the identity loss falls.
  for _ in range(40):
    params, opt_state, metrics = with_identity(params, opt_state, batch)
  assert float(metrics["identity_loss"]) < 0.5 * float(first["identity_loss"])


class _Interrupted(Exception):
  pass


class _StopsAfter:
  """A data iterator that dies after `count` batches, like a preempted job."""

  def __init__(self, iterator, count):
    self._iterator, self._left = iterator, count

  def __next__(self):
    if not self._left:
      raise _Interrupted
    self._left -= 1
    return next(self._iterator)

  def get_state(self):
    return self._iterator.get_state()

  def set_state(self, state):
    self._iterator.set_state(state)


@pytest.fixture(scope="module")
def world_clip(tmp_path_factory):
  """The tiny config's data and a world CLIP trained on it for 60 steps, interrupted after the
  checkpoint at step 30 and resumed."""
  config = load_config("tiny")  # 60 steps of 32 pairs, a one-layer 32-wide CLIP
  workdir = tmp_path_factory.mktemp("world_clip")
  builder.build(config, workdir / "data")
  make_iterator = clip_train.pipeline.make_iterator
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(clip_train, "CHECKPOINT_EVERY", 30)
    patch.setattr(clip_train.pipeline, "make_iterator", lambda *a, **k: _StopsAfter(
        make_iterator(*a, **k), 30))
    with pytest.raises(_Interrupted):
      clip_train.train_world_clip(config, workdir)
  assert not (workdir / "clip" / "summary.json").exists()
  return config, workdir, clip_train.train_world_clip(config, workdir)


def test_world_clip_trains_saves_and_reloads(world_clip):
  config, workdir, summary = world_clip
  out = workdir / "clip"
  for name in ("config.json", "flax_model.msgpack", "vocab.json", "merges.txt",
               "preprocessor_config.json", "summary.json"):
    assert (out / name).exists(), name
  assert json.loads((out / "summary.json").read_text()) == summary
  scorer = clip_lib.ClipScorer.from_pretrained(out)
  assert scorer.image_size == config.image_size and scorer.embed_dim == config.clip.embed_dim
  # The issue's validation: held-out subjects' real images score higher with their own
  # captions than with the others' (chance: 0.5). Loose bounds for a 60-step run.
  assert summary["own_caption_pairwise"] > 0.6
  assert summary["own_caption_beats_mean"] > 0.6
  assert summary["retrieval_top5"] > summary["retrieval_chance_top5"]
  clusters = list(pipeline.ClusterSource(workdir / "data", "eval"))
  again = clip_train.evaluate(scorer, clusters, world_lib.from_config(config))
  for key in ("retrieval_top1", "retrieval_top5", "own_caption_pairwise"):
    assert again[key] == pytest.approx(summary[key], abs=1e-6), key


def test_world_clip_resumes_and_skips_when_complete(world_clip):
  config, workdir, summary = world_clip
  assert summary["steps"] == 60
  logged = [m for m in clip_train.train_lib.read_metrics(workdir / "clip" / "logs")
            if "loss" in m]
  # Steps 1-30 ran once (a restart would have logged step 25 twice), then 31-60.
  assert [m["step"] for m in logged] == [25, 50, 60]
  assert logged[-1]["loss"] < logged[0]["loss"]
  config.clip.num_steps = 100  # would train further if it did not stop at summary.json
  assert clip_train.train_world_clip(config, workdir) == summary
  config.clip.num_steps = 60
