"""Stage `clip` (suti.scoring): world scoring models, or checks of configured real ones."""
import json
import subprocess
import sys

import numpy as np
import pytest
import transformers

from suti import clip as clip_lib
from suti import clip_train
from suti import config_lib
from suti import metrics
from suti import scoring
from tests.conftest import REPO
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


def test_launch_trains_both_world_models_and_reuses_them(tmp_path):
  workdir = tmp_path / "w"
  args = [sys.executable, "-m", "suti.launch", "--config=configs/tiny.py",
          f"--workdir={workdir}", "--stages=data,clip", "--config.clip.num_steps=10",
          "--config.dino.num_steps=10"]
  first = subprocess.run(args, capture_output=True, text=True, cwd=REPO)
  assert first.returncode == 0, first.stderr[-3000:]
  summary = json.loads(first.stdout.strip().splitlines()[-1])["clip"]
  del summary["seconds"]  # launch's wall time for the stage
  assert summary["clip"]["steps"] == 10 and summary["dino"]["num_steps"] == 10
  for name in ("clip", "dino"):
    for file in ("config.json", "flax_model.msgpack", "preprocessor_config.json",
                 "summary.json"):
      assert (workdir / name / file).exists(), (name, file)
  again = subprocess.run(args, capture_output=True, text=True, cwd=REPO)
  assert again.returncode == 0, again.stderr[-3000:]
  reused = json.loads(again.stdout.strip().splitlines()[-1])["clip"]
  assert reused.pop("seconds") < 10 and reused == summary


def test_launch_names_the_missing_scoring_model(tmp_path):
  result = subprocess.run(
      [sys.executable, "-m", "suti.launch", "--config=configs/tiny.py",
       f"--workdir={tmp_path / 'w'}", "--stages=clip", "--config.data.source=folder",
       f"--config.data.path={tmp_path}"], capture_output=True, text=True, cwd=REPO)
  assert result.returncode == 2
  assert "clip.path must point to a pretrained CLIP directory" in result.stderr


def test_world_models_need_the_data_stage(tmp_path, tiny_config):
  with pytest.raises(config_lib.InputError, match="run the data stage"):
    scoring.run(tiny_config, tmp_path)
