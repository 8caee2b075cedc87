"""Tiny: the test-suite config. Every stage finishes in seconds on one CPU core.

The whole pipeline runs in the suite (tests/test_pipeline.py) in under 3 minutes. The suite is
compile-bound, and XLA:CPU's compile time grows with a program's op count, so the UNet has
one level (16x16: a ResBlock and text cross-attention) and the stage `clip` loads the world
CLIP and DINO shipped in the package, as the demo does (tests/test_scoring.py trains them
on tiny's data). tests/test_unet.py checks the network on two levels.
"""
from suti import config_lib


def get_config(arg=None):
  del arg
  c = config_lib.base_config()
  c.image_size = 16
  c.stages = "data"
  c.data.world.num_train_subjects = 8
  c.data.world.num_eval_subjects = 4
  c.data.world.min_images = 3
  c.data.world.max_images = 4
  c.data.world.num_unseen_prompts = 2
  c.data.world.background_blur = 1.5  # the shipped world scorers were made on these scenes
  c.model.channels = 16
  c.model.channel_mult = (1,)
  c.model.attention_resolutions = ()
  c.model.cross_attention_resolutions = (16,)
  c.model.num_heads = 2
  c.model.text_encoder.width = 32
  c.model.text_encoder.num_layers = 1
  c.model.text_encoder.num_heads = 2
  c.diffusion.timesteps = 100
  c.clip.path = "embedded:world_clip_16"
  c.dino.path = "embedded:world_dino_16"
  # With empty paths, `clip` trains tiny world scorers with these settings.
  c.clip.num_steps = 60
  c.clip.batch_size = 32
  c.clip.learning_rate = 2e-3
  c.clip.width = 32
  c.clip.embed_dim = 32
  c.clip.num_layers = 1
  c.dino.num_steps = 150
  c.dino.batch_size = 16
  c.dino.learning_rate = 3e-3
  c.dino.patch_size = 2
  c.dino.width = 32
  c.dino.num_layers = 1
  c.dino.num_heads = 2
  c.pretrain.num_steps = 20
  c.pretrain.batch_size = 8
  c.pretrain.warmup_steps = 2
  c.pretrain.log_every = 5
  c.pretrain.sample_every = 20
  c.pretrain.num_samples = 4
  c.pretrain.sample_steps = 5
  c.pretrain.checkpoint_every = 20  # one save: an orbax save is ~1.5 s, the 20 steps ~5 s
  c.experts.num_experts = 4
  c.experts.num_steps = 5
  c.experts.batch_size = 2
  c.experts.sample_steps = 5
  c.apprentice.num_steps = 20
  c.apprentice.batch_size = 4
  c.apprentice.sample_steps = 5
  c.apprentice.finetune_steps = 2
  c.apprentice.log_every = 5
  c.apprentice.checkpoint_every = 20
  c.apprentice.sample_every = 20
  c.apprentice.num_sample_subjects = 2
  c.evaluate.num_subjects = 2
  c.evaluate.sample_steps = 5
  c.evaluate.max_demos = 3
  return c
