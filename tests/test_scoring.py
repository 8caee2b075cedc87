"""Stage `clip` (suti.scoring): world scoring models, or checks of configured real ones."""
import json
import subprocess
import sys

import numpy as np
import pytest
import transformers

from suti import assets
from suti import clip as clip_lib
from suti import clip_train
from suti import config_lib
from suti import metrics
from suti import scoring
from tests.conftest import REPO, load_config
from tests.test_clip import random_params, tiny_clip_config


@pytest.fixture(scope="module")
def real_dirs(tmp_path_factory):
  """Tiny 'pretrained' CLIP and ViT directories, as a user would point clip.path / dino.path at."""
  root = tmp_path_factory.mktemp("real")
  clip_dir, dino_dir = root / "clip", root / "dino"
  tokenizer = clip_train.save_world_tokenizer(clip_dir)
  model = transformers.FlaxCLIPModel(tiny_clip_config(tokenizer.get_vocab()), _do_init=False)
  model.save_pretrained(clip_dir, params=random_params(model))
  vit = transformers.ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=32, image_size=8, patch_size=4)
  transformers.FlaxViTModel(vit, add_pooling_layer=False).save_pretrained(dino_dir)
  return clip_dir, dino_dir


def test_configured_models_are_loaded_not_trained(tmp_path, tiny_config, real_dirs):
  clip_dir, dino_dir = real_dirs
  tiny_config.clip.path, tiny_config.dino.path = str(clip_dir), str(dino_dir)
  tiny_config.data.source = "folder"  # real photos: fine, the models are given
  summary = scoring.run(tiny_config, tmp_path)
  assert summary == {"clip": {"path": str(clip_dir), "trained": False},
                     "dino": {"path": str(dino_dir), "trained": False}}
  assert not (tmp_path / "clip").exists() and not (tmp_path / "dino").exists()
  clip = scoring.load_clip(tiny_config, tmp_path)
  dino = scoring.load_dino(tiny_config, tmp_path)
  images = np.random.default_rng(0).integers(0, 256, (2, 8, 8, 3), np.uint8)
  assert isinstance(clip, clip_lib.ClipScorer) and clip.embed_images(images).shape == (2, 8)
  assert isinstance(dino, metrics.DinoScorer) and dino.embed_images(images).shape == (2, 16)


def test_real_photos_need_real_scoring_models(tmp_path, tiny_config, real_dirs):
  tiny_config.data.source = "dreambench"
  tiny_config.clip.path = tiny_config.dino.path = ""
  with pytest.raises(scoring.ScoringModelError, match="clip.path must point"):
    scoring.run(tiny_config, tmp_path)
  tiny_config.clip.path = str(real_dirs[0])
  with pytest.raises(scoring.ScoringModelError, match="dino.path must point"):
    scoring.run(tiny_config, tmp_path)


def test_a_configured_directory_missing_files_is_named(tmp_path, tiny_config, real_dirs):
  (tmp_path / "empty").mkdir()
  tiny_config.clip.path = str(real_dirs[0])
  tiny_config.dino.path = str(tmp_path / "empty")
  with pytest.raises(FileNotFoundError, match="empty.*has no config.json"):
    scoring.run(tiny_config, tmp_path)


def test_launch_trains_both_world_models_and_reuses_them(tmp_path, monkeypatch):
  workdir = tmp_path / "w"
  args = [sys.executable, "-m", "suti.launch", "--config=configs/tiny.py",
          f"--workdir={workdir}", "--stages=data,clip", "--config.clip.path=",
          "--config.dino.path=", "--config.clip.num_steps=10", "--config.dino.num_steps=10",
          "--config.clip.identity_weight=5.0"]  # as the demo's
  first = subprocess.run(args, capture_output=True, text=True, cwd=REPO)
  assert first.returncode == 0, first.stderr[-3000:]
  summary = json.loads(first.stdout.strip().splitlines()[-1])["clip"]
  del summary["seconds"]  # launch's wall time for the stage
  assert summary["clip"]["steps"] == 10 and summary["dino"]["num_steps"] == 10
  logged = [m for m in clip_train.train_lib.read_metrics(workdir / "clip" / "logs")
            if "loss" in m][-1]
  assert logged["loss"] == pytest.approx(logged["text_loss"] + 5.0 * logged["identity_loss"],
                                         rel=1e-4)
  assert summary["clip"]["pairs_per_step"] == 4 * (4 + clip_train.IDENTITY_VIEWS)  # 32 // 7
  for name in ("clip", "dino"):
    for file in ("config.json", "flax_model.msgpack", "preprocessor_config.json",
                 "summary.json"):
      assert (workdir / name / file).exists(), (name, file)
  again = subprocess.run(args, capture_output=True, text=True, cwd=REPO)
  assert again.returncode == 0, again.stderr[-3000:]
  reused = json.loads(again.stdout.strip().splitlines()[-1])["clip"]
  assert reused.pop("seconds") < 10 and reused == summary

  # Shipped as configs/world_scorers.py's are, they load as 'embedded:NAME' with no training.
  monkeypatch.setattr(assets, "ASSETS_DIR", tmp_path / "assets")
  shipped = assets.ship_world_scorers(workdir)
  assert [p.name for p in shipped] == ["world_clip_16", "world_dino_16"]
  assert not (shipped[0] / "checkpoints").exists() and not (shipped[0] / "logs").exists()
  config = load_config("tiny")
  config.clip.path, config.dino.path = "embedded:world_clip_16", "embedded:world_dino_16"
  loaded = scoring.run(config, tmp_path / "fresh")
  assert not (tmp_path / "fresh").exists()
  assert loaded["clip"]["trained"] is False and loaded["dino"]["trained"] is False
  for name in ("clip", "dino"):  # the shipped run's held-out numbers, as report.md shows them
    assert {k: v for k, v in loaded[name].items() if k in summary[name] and k != "path"} == {
        k: v for k, v in summary[name].items() if k != "path"}
  assert loaded["clip"]["provenance"]["config"]["clip"]["num_steps"] == 10
  images = np.random.default_rng(0).integers(0, 256, (3, 16, 16, 3), np.uint8)
  np.testing.assert_allclose(
      scoring.load_clip(config, tmp_path).embed_images(images),
      clip_lib.ClipScorer.from_pretrained(workdir / "clip").embed_images(images), atol=1e-6)
  # Made for other images than this config's: refused, naming both values.
  config.image_size = 32
  with pytest.raises(config_lib.InputError, match=r"clip.path 'embedded:world_clip_16' was made "
                     r"with image_size=16; this config has image_size=32"):
    scoring.run(config, tmp_path / "fresh")
  config.clip.path = "embedded:world_clip_99"
  with pytest.raises(config_lib.InputError, match=r"clip.path 'embedded:world_clip_99': no "
                     r"embedded model 'world_clip_99'.*'world_clip_16'"):
    scoring.load_clip(config, tmp_path)


def test_the_demo_scores_with_its_shipped_world_models(tmp_path):
  """configs/demo.py loads the world CLIP and DINO shipped in the package; asset.json says
  they are what configs/world_scorers.py trains from the demo's own sections."""
  config = load_config("demo")
  summary = scoring.run(config, tmp_path)
  assert not (tmp_path / "clip").exists() and not (tmp_path / "dino").exists()
  remake = load_config("world_scorers")
  assert remake.stages == "data,clip" and remake.clip.path == remake.dino.path == ""
  for name in ("clip", "dino"):
    made = summary[name]["provenance"]
    assert made["config"][name] == dict(remake[name].to_dict(), path="")
    assert made["config"]["image_size"] == config.image_size
    assert made["config"]["data.world.background_blur"] == config.data.world.background_blur
  # Trained models, not initialisations: held-out retrieval far above chance, a delta-CLIP
  # filter that passes the oracle's answers and fails most prompt-ignoring samples, and a
  # DINO that tells subjects of one category apart.
  clip = summary["clip"]
  assert clip["retrieval_top1"] > 5 * clip["retrieval_chance_top1"]
  assert clip["delta_oracle_pass"] > 0.9 and clip["delta_ignored_pass"] < 0.5
  assert summary["dino"]["auc"] > 0.75
  assert load_config("demo", "32").clip.path == ""  # none shipped at 32x32


def test_launch_names_the_missing_scoring_model(tmp_path):
  result = subprocess.run(
      [sys.executable, "-m", "suti.launch", "--config=configs/tiny.py",
       f"--workdir={tmp_path / 'w'}", "--stages=clip", "--config.data.source=folder",
       "--config.clip.path=", "--config.dino.path=",
       f"--config.data.path={tmp_path}"], capture_output=True, text=True, cwd=REPO)
  assert result.returncode == 2
  assert "clip.path must point to a pretrained CLIP directory" in result.stderr


def test_world_models_need_the_data_stage(tmp_path, tiny_config):
  tiny_config.clip.path = tiny_config.dino.path = ""  # to be trained on the world's data
  with pytest.raises(config_lib.InputError, match="run the data stage"):
    scoring.run(tiny_config, tmp_path)
