"""Config files load, validate, and bad values are refused with the key and value named."""
import pytest

from suti import config_lib
from tests.conftest import load_config


@pytest.mark.parametrize("name,arg", [("tiny", None), ("demo", None), ("demo", "64"),
                                      ("bench", None), ("paper", None)])
def test_shipped_configs_validate(name, arg):
  config = load_config(name, arg)
  assert config_lib.validate(config) is config


def test_paper_config_has_published_settings():
  c = load_config("paper")
  assert c.image_size == 64
  assert (c.experts.num_experts, c.experts.num_steps) == (400, 500)
  assert (c.experts.optimizer, c.experts.learning_rate) == ("adafactor", 1e-5)
  assert (c.experts.sampler, c.experts.guidance, c.experts.delta_clip_threshold) == \
      ("ddpm", 30.0, 0.02)
  assert (c.apprentice.num_steps, c.apprentice.optimizer, c.apprentice.learning_rate) == \
      (150_000, "adafactor", 1e-4)
  assert (c.apprentice.num_train_demos, c.apprentice.num_inference_demos,
          c.apprentice.guidance) == (3, 4, 15.0)


def test_dreambench_config_requires_path():
  config = load_config("dreambench")
  with pytest.raises(config_lib.ConfigError, match="data.path must name a folder"):
    config_lib.validate(config)
  config.data.path = "/some/dataset"
  config_lib.validate(config)


@pytest.mark.parametrize("key,value,message", [
    ("experts.num_steps", -3, "experts.num_steps must be an integer > 0, got -3"),
    ("experts.num_experts", 0, "experts.num_experts must be an integer > 0, got 0"),
    ("apprentice.num_inference_demos", 0, "apprentice.num_inference_demos must be an integer"),
    ("data.min_demos", 0, "data.min_demos must be an integer > 0, got 0"),
    ("image_size", 30, "image_size must be divisible by the UNet's downsampling factor 4"),
    ("data.source", "imagenet", "data.source must be one of world, dreambench, folder, "
                                "got 'imagenet'"),
    ("experts.sampler", "euler", "experts.sampler must be one of ddpm, ddim"),
    ("experts.learning_rate", 0.0, "experts.learning_rate must be > 0, got 0.0"),
    ("pretrain.caption_dropout", 1.0, r"pretrain.caption_dropout must be in \[0, 1\)"),
    ("model.attention_resolutions", (5,), "model.attention_resolutions has 5"),
    ("mesh.expert", 0, "mesh.expert must be a positive integer or -1"),
    ("stages", "data,pretrian", "unknown stage 'pretrian'"),
    ("stages", " , ", "stages must name at least one stage"),
    ("data.world.background_blur", 5.0, r"data.world.background_blur must be a number of "
                                        r"pixels in \[0, image_size / 4 = 4\], got 5.0"),
    ("apprentice.num_train_demos", 4, r"apprentice.num_train_demos \(4\) must be <= "
                                      r"data.min_demos \(3\)"),
    ("apprentice.freeze_base", True, "apprentice.base_learning_rate is set but "
                                     "apprentice.freeze_base is True"),
    ("apprentice.demo_num_heads", 3, r"model.channels \(32\) must be divisible by "
                                     r"apprentice.demo_num_heads \(3\)"),
    ("apprentice.demo_num_heads", -1, "apprentice.demo_num_heads must be an integer >= 0"),
    ("pretrain.oracle_fraction", 1.5, r"pretrain.oracle_fraction must be in \[0, 1\], got 1.5"),
    ("experts.min_demo_identity", 1.5, r"experts.min_demo_identity is a cosine, so must be in "
                                       r"\[-1, 1\] \(or unset\), got 1.5"),
])
def test_bad_values_name_key_and_value(key, value, message):
  config = load_config("demo")
  node = config
  *parents, leaf = key.split(".")
  for part in parents:
    node = node[part]
  node[leaf] = value
  with pytest.raises(config_lib.ConfigError, match=message):
    config_lib.validate(config)


def test_parse_stages_keeps_order():
  assert config_lib.parse_stages("pretrain, data") == ["pretrain", "data"]


def test_demo_config_sizes_and_a_bad_argument():
  sizes = {arg: load_config("demo", arg) for arg in (None, "32", "64")}
  assert [c.image_size for c in sizes.values()] == [16, 32, 64]
  # The same network at every size: attention and patches at the same fractions of the image.
  for c in sizes.values():
    assert c.model.attention_resolutions == (c.image_size // 4,)
    assert c.model.cross_attention_resolutions == (c.image_size, c.image_size // 2,
                                                   c.image_size // 4)
    assert c.image_size // c.clip.patch_size == 8
  with pytest.raises(config_lib.ConfigError, match="configs/demo.py takes no argument"):
    load_config("demo", "128")


def test_oracle_pretraining_needs_the_embedded_world():
  config = load_config("demo")
  config.pretrain.oracle_fraction = 0.5
  config.data.source, config.data.path = "folder", "/data/photos"
  with pytest.raises(config_lib.ConfigError, match="pretrain.oracle_fraction is 0.5 but "
                                                   "data.source is 'folder'"):
    config_lib.validate(config)
