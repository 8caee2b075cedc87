"""Bench: the demo's pipeline with more of everything, for evaluate's table on a 2-core CPU.

`python -m suti.launch --config=configs/bench.py`: the same 16x16 world and network as
configs/demo.py, with a base pre-trained on ~7x the images, 4x the experts (and so 4x the
apprentice's buffer) at 100 steps each, 6x the apprentice steps, and an evaluation on 16
held-out subjects with all 4 of their prompts. From the demo's measured stage rates it should
take 70-90 minutes; it has not been run end to end yet (docs/RESULTS.md, issue 7). `:32` /
`:64` as in the demo.
"""
import pathlib

from suti import config_lib


def get_config(arg=None):
  c = config_lib.load_config_file(pathlib.Path(__file__).with_name("demo.py"), arg)
  c.data.world.num_train_subjects = 2048
  c.data.world.num_eval_subjects = 32
  c.clip.num_steps = 600
  c.dino.num_steps = 600
  c.pretrain.num_steps = 8000
  c.pretrain.checkpoint_every = 1000
  c.pretrain.sample_every = 2000
  c.pretrain.warmup_steps = 200
  c.experts.num_rounds = 8
  c.experts.num_steps = 100
  c.apprentice.num_steps = 3000
  c.apprentice.warmup_steps = 100
  c.apprentice.checkpoint_every = 500
  c.apprentice.sample_every = 1000
  c.evaluate.num_subjects = 16
  c.evaluate.prompts_per_subject = 4
  c.evaluate.max_demos = 5
  return c
