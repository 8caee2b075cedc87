"""Demo: the embedded subject world, the whole pipeline on a 2-core CPU.

`python -m suti.launch --config=configs/demo.py` runs it; `:64` selects 64x64 images.
"""
from suti import config_lib


def get_config(arg=None):
  c = config_lib.base_config()
  c.image_size = 64 if arg == "64" else 32
  # Attention sits at fixed fractions of the image, so the :64 variant is the same network.
  c.model.attention_resolutions = (c.image_size // 4,)
  c.model.cross_attention_resolutions = (c.image_size // 2, c.image_size // 4)
  c.apprentice.demo_attention_resolutions = (c.image_size // 4,)
  c.stages = "data,clip,pretrain,experts"
  # The world's scoring models (stage `clip`, docs/RESULTS.md): ~4 CPU-minutes for CLIP
  # (held-out retrieval well above chance) and ~5 for the DINO ViT (held-out AUC >= 0.95).
  c.clip.num_steps = 800
  c.clip.learning_rate = 2e-3
  # Sized by benchmarks/bench_pretrain.py (docs/RESULTS.md): ~17 images/s at 32x32 on 2 cores,
  # flat in the batch size, so 300 steps of 16 is ~5 min of pre-training.
  c.pretrain.num_steps = 300
  c.pretrain.batch_size = 16
  c.pretrain.warmup_steps = 30
  c.pretrain.log_every = 25
  c.pretrain.checkpoint_every = 100
  c.pretrain.sample_every = 300
  # Experts: 16 packed in one step (benchmarks/bench_experts.py: ~1.7 s a step at 32x32 on
  # 2 cores), 2 rounds of 16 subjects for the demo's time budget.
  c.experts.num_experts = 16
  c.experts.num_steps = 100
  c.experts.num_rounds = 2
  c.data.world.num_train_subjects = 64
  c.data.world.num_eval_subjects = 16
  c.data.world.min_images = 3
  c.data.world.max_images = 6
  c.data.world.num_unseen_prompts = 4
  return c
