"""Bench: the demo's pipeline with 3x the experts and apprentice steps, for evaluate's table.

`python -m suti.launch --config=configs/bench.py` (28.5 minutes on a 2-core CPU, cold): the
same 16x16 world, base model and recipe as configs/demo.py, with 6 rounds of 16 experts instead
of 2 (a buffer of ~600 admitted pseudo-targets from 96 subjects instead of ~200 from 32), the
apprentice trained 1500 steps instead of 500, and evaluation on all 16 held-out subjects.
On the demo's base, this is what lifts the apprentice from the base's DINO to above the
experts' (docs/RESULTS.md, issue 7). `:32` / `:64` as in the demo.
"""
import pathlib

from suti import config_lib


def get_config(arg=None):
  c = config_lib.load_config_file(pathlib.Path(__file__).with_name("demo.py"), arg)
  c.experts.num_rounds = 6
  c.apprentice.num_steps = 1500
  c.apprentice.checkpoint_every = 500
  c.apprentice.sample_every = 500
  c.evaluate.num_subjects = 16
  return c
