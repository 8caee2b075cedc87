"""Paper: SuTI's published settings (Chen et al., 2023), for TPU pods.

Imagen 64x64 base model (~2.1B parameters), K=400 experts (one per TPU core), 500 expert steps
with Adafactor at lr 1e-5, DDPM sampling with guidance 30, delta-CLIP lambda 0.02; the apprentice
trains 150K steps with Adafactor at lr 1e-4 on 3 demos and generates from 4 demos, guidance 15.
"""
from suti import config_lib


def get_config(arg=None):
  del arg
  c = config_lib.base_config()
  c.image_size = 64
  c.stages = "data,clip,pretrain,experts,apprentice,evaluate,export"
  c.model.channels = 512
  c.model.channel_mult = (1, 2, 3, 4)
  c.model.num_res_blocks = 3
  c.model.attention_resolutions = (32, 16, 8)
  c.model.cross_attention_resolutions = (32, 16, 8)
  c.model.num_heads = 8
  c.model.dtype = "bfloat16"
  c.model.text_encoder.kind = "t5"   # Imagen: frozen T5-XXL, given by path
  c.model.text_encoder.max_length = 128
  c.model.text_encoder.width = 4096
  c.diffusion.timesteps = 1000
  c.pretrain.batch_size = 2048
  c.pretrain.optimizer = "adafactor"
  c.pretrain.learning_rate = 1e-4
  c.experts.num_experts = 400
  c.experts.experts_per_device = 1
  c.experts.num_steps = 500
  c.experts.batch_size = 4
  c.experts.optimizer = "adafactor"
  c.experts.learning_rate = 1e-5
  c.experts.sampler = "ddpm"
  c.experts.sample_steps = 1000
  c.experts.guidance = 30.0
  c.experts.delta_clip_threshold = 0.02
  c.apprentice.num_steps = 150_000
  c.apprentice.batch_size = 64
  c.apprentice.optimizer = "adafactor"
  c.apprentice.learning_rate = 1e-4
  c.apprentice.num_train_demos = 3
  c.apprentice.num_inference_demos = 4
  c.apprentice.guidance = 15.0
  c.apprentice.finetune_steps = 500
  # Re-Imagen: demo attention (+ feed-forward) wherever the base has text cross-attention;
  # ~430M new params, 2.55B in all (SuTI: 2.5B).
  c.apprentice.demo_attention_resolutions = (32, 16, 8)
  c.apprentice.sample_steps = 1000
  # Imagen's base model: batch 2048 on 256 TPU v4 chips, one 32 GiB device each.
  c.plan.num_devices = 256
  c.plan.device_memory_gib = 32.0
  return c
