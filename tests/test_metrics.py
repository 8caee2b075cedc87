"""DreamBench metrics on constructed cases, the DINO loading path, and the world DINO."""
import json

import numpy as np
import pytest

from suti import metrics

transformers = pytest.importorskip("transformers")


class ColourScorer:
  """A stand-in CLIP: an image's embedding is its mean colour, a prompt's a colour word's."""
  WORDS = {"red": (1.0, 0.0, 0.0), "green": (0.0, 1.0, 0.0), "blue": (0.0, 0.0, 1.0)}

  def embed_images(self, images):
    return metrics.l2_normalize(metrics.check_images(images).mean(axis=(1, 2)) + 1e-6)

  def embed_texts(self, prompts):
    return metrics.l2_normalize([self.WORDS[p.split()[1]] for p in prompts])


def solid(*colours, size=8):
  return np.stack([np.broadcast_to(np.asarray(c, np.uint8), (size, size, 3)) for c in colours])


RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


@pytest.fixture(scope="module")
def tiny_vit_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp("vit")
  config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=64, image_size=16, patch_size=4,
                                  initializer_range=0.5)  # large: images embed far apart
  transformers.FlaxViTModel(config, seed=3).save_pretrained(path)
  return path


@pytest.fixture(scope="module")
def dino(tiny_vit_dir):
  return metrics.DinoScorer.from_pretrained(tiny_vit_dir)


def test_known_embeddings_give_known_numbers():
  clip = ColourScorer()
  generated = solid(RED, GREEN)
  scores = metrics.subject_scores(generated, ["a red ball", "a blue ball"], solid(RED, BLUE),
                                  clip=clip)
  # red vs {red, blue}: (1 + 0) / 2; green vs {red, blue}: 0. Prompts: red-red 1, green-blue 0.
  assert scores["clip_i"] == pytest.approx(0.25, abs=1e-5)
  assert scores["clip_t"] == pytest.approx(0.5, abs=1e-5)
  assert scores["num_images"] == 2
  assert metrics.image_similarity(clip, solid(RED), solid(GREEN)) == pytest.approx(0, abs=1e-5)
  assert metrics.clip_t(clip, solid(RED), ["a red ball"]) == pytest.approx(1, abs=1e-5)


def test_identical_images_score_one(dino):
  images = np.random.default_rng(0).integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
  scores = metrics.subject_scores(images[:1], ["a red ball"], images[:1], clip=ColourScorer(),
                                  dino=dino)
  assert scores["clip_i"] == pytest.approx(1, abs=1e-5)
  assert scores["dino"] == pytest.approx(1, abs=1e-5)
  assert scores["clip_t"] < 1  # not a red image


def test_dino_scorer_matches_the_flax_vit(tiny_vit_dir, dino):
  images = np.random.default_rng(1).integers(0, 256, (5, 16, 16, 3), dtype=np.uint8)
  model = transformers.FlaxViTModel.from_pretrained(tiny_vit_dir)
  # No preprocessor_config.json: ImageNet mean / std, NCHW.
  pixels = (images / 255.0 - metrics.IMAGENET_MEAN) / metrics.IMAGENET_STD
  cls = np.asarray(model(pixels.transpose(0, 3, 1, 2)).last_hidden_state[:, 0])
  np.testing.assert_allclose(dino.embed_images(images), metrics.l2_normalize(cls), atol=1e-5)
  assert dino.embed_images(images).shape == (5, 32)
  # Other sizes are resized to the model's; batches of any count give the same rows.
  assert dino.embed_images(np.repeat(np.repeat(images, 2, 1), 2, 2)).shape == (5, 32)
  np.testing.assert_allclose(dino.embed_images(images[:2]), dino.embed_images(images)[:2],
                             atol=1e-5)


def test_dino_scorer_reads_preprocessor_config(tmp_path, tiny_vit_dir):
  for name in ("config.json", "flax_model.msgpack"):
    (tmp_path / name).write_bytes((tiny_vit_dir / name).read_bytes())
  (tmp_path / metrics.PREPROCESSOR_FILE).write_text(json.dumps(
      {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}))
  scorer = metrics.DinoScorer.from_pretrained(tmp_path)
  np.testing.assert_array_equal(scorer.mask_fill, [128, 128, 128])
  np.testing.assert_allclose(scorer.image_std, 0.5)


def test_missing_files_are_named(tmp_path, tiny_vit_dir):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    metrics.DinoScorer.from_pretrained(tmp_path / "nowhere")
  with pytest.raises(FileNotFoundError, match=r"has no config\.json"):
    metrics.DinoScorer.from_pretrained(tmp_path)
  (tmp_path / "config.json").write_bytes((tiny_vit_dir / "config.json").read_bytes())
  with pytest.raises(FileNotFoundError, match=f"{tmp_path}.*flax_model.msgpack"):
    metrics.DinoScorer.from_pretrained(tmp_path)


def test_masked_metrics_ignore_the_background(dino):
  rng = np.random.default_rng(2)
  generated = rng.integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
  references = rng.integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
  gen_masks = np.zeros((2, 16, 16), bool)
  gen_masks[:, 4:12, 5:11] = True
  ref_masks = np.zeros((3, 16, 16), bool)
  ref_masks[:, 2:9, 3:13] = True
  kwargs = dict(dino=dino, clip=ColourScorer(), generated_masks=gen_masks,
                reference_masks=ref_masks)
  before = metrics.subject_scores(generated, None, references, **kwargs)
  new_generated = np.where(gen_masks[..., None], generated, 255 - generated)
  new_references = np.where(ref_masks[..., None], references, rng.permutation(references))
  after = metrics.subject_scores(new_generated, None, new_references, **kwargs)
  assert after["mdino"] == pytest.approx(before["mdino"], abs=1e-6)
  assert after["mclip_i"] == pytest.approx(before["mclip_i"], abs=1e-6)
  assert after["dino"] != pytest.approx(before["dino"], abs=1e-4)  # the unmasked one moves


def test_only_reference_masks_masks_only_the_references(dino):
  rng = np.random.default_rng(3)
  generated = rng.integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
  references = rng.integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
  masks = rng.random((2, 16, 16)) < 0.5
  scores = metrics.subject_scores(generated, None, references, dino=dino,
                                  reference_masks=masks)
  masked_refs = metrics.mask_background(references, masks, dino.mask_fill)
  expected = metrics.image_similarity(dino, generated, masked_refs)
  assert scores["mdino"] == pytest.approx(expected, abs=1e-6)
  assert "mclip_i" not in scores and "clip_i" not in scores  # no CLIP scorer given
  plain = metrics.subject_scores(generated, None, references, dino=dino)
  assert "mdino" not in plain


def test_mask_background_uses_the_fill():
  images = solid(RED, GREEN, size=4)
  masks = np.zeros((2, 4, 4), bool)
  masks[0, 0, 0] = True
  out = metrics.mask_background(images, masks, (1, 2, 3))
  np.testing.assert_array_equal(out[0, 0, 0], RED)
  np.testing.assert_array_equal(out[0, 1, 1], (1, 2, 3))
  np.testing.assert_array_equal(out[1], np.broadcast_to((1, 2, 3), (4, 4, 3)))


@pytest.mark.parametrize("images, match", [
    (np.zeros((2, 8, 8, 3), np.float32), "uint8"),
    (np.zeros((8, 8, 3), np.uint8), r"\[N, H, W, 3\]"),
    (np.zeros((2, 8, 8, 4), np.uint8), r"\[N, H, W, 3\]"),
    (np.zeros((0, 8, 8, 3), np.uint8), "empty"),
])
def test_bad_images_are_named(images, match):
  with pytest.raises(ValueError, match=match):
    metrics.subject_scores(images, None, solid(RED), clip=ColourScorer())
  with pytest.raises(ValueError, match=f"reference images.*{match}"):
    metrics.subject_scores(solid(RED), None, images, clip=ColourScorer())


def test_bad_prompts_and_masks_are_named():
  clip = ColourScorer()
  with pytest.raises(ValueError, match="prompt 1 is empty"):
    metrics.subject_scores(solid(RED, RED), ["a red ball", " "], solid(RED), clip=clip)
  with pytest.raises(ValueError, match="2 prompts for 1 images"):
    metrics.clip_t(clip, solid(RED), ["a red ball", "a red ball"])
  with pytest.raises(ValueError, match="reference masks must have shape"):
    metrics.subject_scores(solid(RED), None, solid(RED), clip=clip,
                           reference_masks=np.ones((1, 4, 4), bool))
  with pytest.raises(ValueError, match="generated masks must be bool"):
    metrics.subject_scores(solid(RED), None, solid(RED), clip=clip,
                           generated_masks=np.ones((1, 8, 8), np.uint8))


def test_aggregate_weights_by_image_count():
  table = metrics.aggregate([{"dino": 1.0, "mdino": 0.5, "num_images": 3},
                             {"dino": 0.0, "num_images": 1}])
  assert table["dino"] == pytest.approx(0.75)
  assert table["mdino"] == pytest.approx(0.5)  # only the subject that has it
  assert table["num_subjects"] == 2 and table["num_images"] == 4
  # Kish: n_eff = 4^2 / (9 + 1) = 1.6, weighted variance 0.1875 -> sqrt(0.1875 / 0.6).
  assert table["dino_se"] == pytest.approx(np.sqrt(0.1875 / 0.6))
  assert "mdino_se" not in table  # one subject has it: no spread to measure
  with pytest.raises(ValueError, match="at least one"):
    metrics.aggregate([])


def test_standard_error_over_subjects_is_the_textbook_one_for_equal_weights():
  values = [0.2, 0.4, 0.9, 0.55]
  table = metrics.aggregate([{"clip_i": v, "num_images": 4} for v in values])
  assert table["clip_i_se"] == pytest.approx(np.std(values, ddof=1) / 2)
  # Twice as many subjects with the same spread: a smaller error.
  doubled = metrics.aggregate([{"clip_i": v, "num_images": 4} for v in values * 2])
  assert doubled["clip_i_se"] < table["clip_i_se"]
  assert metrics.aggregate([{"clip_i": 0.3}, {"clip_i": 0.3}])["clip_i_se"] == 0.0
  with pytest.raises(ValueError, match="at least 2"):
    metrics.weighted_standard_error([0.5], [1.0])


def test_evaluation_table_shows_the_standard_error_beside_each_mean():
  from suti import evaluate
  row = metrics.aggregate([{"dino": 0.7, "clip_t": 0.6, "num_images": 2},
                           {"dino": 0.5, "clip_t": 0.6, "num_images": 2}])
  markdown = evaluate.format_table({"suti": dict(row, seconds_per_subject=1.5),
                                    "oracle": {"dino": 0.9, "seconds_per_subject": 0.0}})
  lines = markdown.splitlines()
  assert lines[0] == "| method | DINO | CLIP-T | s/subject |"
  assert lines[2] == "| suti | 0.600 ± 0.100 | 0.600 ± 0.000 | 1.5 |"
  assert lines[3] == "| oracle | 0.900 |  | 0.0 |"
  assert "standard error over subjects" in markdown


def test_paired_difference_cancels_what_subjects_share():
  from suti import evaluate
  # Subject difficulty moves both methods together; a beats b by 0.1, 0.05 and 0.2.
  a = [{"dino": 0.3, "clip_t": 0.6, "num_images": 4}, {"dino": 0.55, "clip_t": 0.6,
       "num_images": 4}, {"dino": 0.9, "clip_t": 0.5, "num_images": 4}]
  b = [{"dino": 0.2, "clip_t": 0.6, "num_images": 4}, {"dino": 0.5, "clip_t": 0.6,
       "num_images": 4}, {"dino": 0.7, "clip_t": 0.6, "num_images": 4}]
  diff = metrics.paired_difference(a, b)
  assert diff["dino"] == pytest.approx(metrics.aggregate(a)["dino"]
                                       - metrics.aggregate(b)["dino"])
  assert diff["dino_se"] == pytest.approx(np.std([0.1, 0.05, 0.2], ddof=1) / np.sqrt(3))
  # Far below the unpaired error of the two rows, which carries the subjects' spread.
  unpaired = np.hypot(metrics.aggregate(a)["dino_se"], metrics.aggregate(b)["dino_se"])
  assert diff["dino_se"] < 0.25 * unpaired
  assert diff["clip_t"] == pytest.approx(-0.1 / 3)
  line = evaluate.format_paired(diff)
  assert line.startswith("suti minus experts, paired over subjects")
  assert f"DINO +0.117 ± {diff['dino_se']:.3f}" in line and "CLIP-T -0.033" in line
  with pytest.raises(ValueError, match="same subjects"):
    metrics.paired_difference(a, b[:2])
  with pytest.raises(ValueError, match="image counts"):
    metrics.paired_difference(a, [dict(s, num_images=2) for s in b])


def test_auc():
  assert metrics.auc([2, 3], [0, 1]) == 1.0
  assert metrics.auc([0, 1], [2, 3]) == 0.0
  assert metrics.auc([1, 1], [1, 1]) == 0.5
  assert metrics.auc([1, 3], [2]) == 0.5


def test_world_dino_tells_held_out_subjects_apart(tmp_path, tiny_config):
  from suti import identity_train
  from suti.data import builder
  builder.build(tiny_config, tmp_path / "data")
  # The tiny config's few seconds of training: 64 tokens a 16x16 image (as the demo's 32x32
  # with patch 4), a one-layer ViT. An untrained one scores ~0.47.
  kwargs = dict(num_train_subjects=64, num_eval_subjects=45)
  summary = identity_train.train_identity_encoder(tiny_config, tmp_path, **kwargs)
  # Held-out subjects of the same class, other backgrounds: clearly above chance (the demo
  # config's two-minute run reaches >= 0.95).
  assert summary["auc"] > 0.7, summary  # measured 0.79
  assert {"auc_masked", "auc_accessory", "auc_recolour", "auc_style"} <= set(summary)
  assert summary["num_train_subjects"] == 64 and summary["num_eval_subjects"] == 45
  assert (tmp_path / "dino" / metrics.PREPROCESSOR_FILE).exists()
  scorer = metrics.DinoScorer.from_pretrained(tmp_path / "dino")
  assert scorer.embed_images(np.zeros((2, 16, 16, 3), np.uint8)).shape == (2, 32)
  again = identity_train.train_identity_encoder(tiny_config, tmp_path, **kwargs)
  assert again == summary  # complete: reused, not retrained
