"""Bench: the demo's pipeline with 3x the experts and ~4x the apprentice steps, for the table.

`python -m suti.launch --config=configs/bench.py`: the same 16x16 world, base model and recipe
as configs/demo.py, with 12 rounds of 8 experts instead of 4 (a buffer of ~600 admitted
pseudo-targets from 96 subjects instead of ~200 from 32), the apprentice trained 1500 steps
instead of 400, and evaluation on all 16 held-out subjects. Its table in docs/RESULTS.md
(28.5 minutes, SuTI DINO 0.607 against the experts' 0.598) was measured with the demo's
previous recipe (16-expert packs, 1100 pre-training steps, demo attention at 8x8 only) and
has not been re-run with this one. `:32` / `:64` as in the demo.
"""
import pathlib

from suti import config_lib


def get_config(arg=None):
  c = config_lib.load_config_file(pathlib.Path(__file__).with_name("demo.py"), arg)
  c.experts.num_rounds = 12
  c.apprentice.num_steps = 1500
  c.apprentice.checkpoint_every = 500
  c.apprentice.sample_every = 500
  c.evaluate.num_subjects = 16
  return c
