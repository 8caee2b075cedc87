"""Bench: the demo's pipeline with 3x the expert subjects, for evaluate's table (issue 7).

`python -m suti.launch --config=configs/bench.py`: the 16x16 world, shipped base and scorers
of configs/demo.py, with
- 12 rounds of 8 experts (96 training subjects, 2 unseen prompts each, ~360 admitted
  pseudo-targets) where the demo has 4 rounds (32 subjects, 4 prompts each). On one demo
  buffer's held-out images, 64 subjects instead of 32 lifted SuTI's CLIP-I from 0.416 to 0.453
  at the same DINO: the apprentice learns to copy from how many subjects it saw, not from how
  many samples of each (docs/RESULTS.md, issue 7);
- SuTI sampled with separate demo and text guidance (`image_first`, demos 2.5, text 1.5),
  which trades some of its CLIP-T margin over the experts for CLIP-I;
- evaluation on 32 held-out subjects x 4 prompts (128 images a row), every method.

The demo keeps 32 subjects to stay under 20 minutes on the slowest 2-core CPU measured; the
bench took 28.5 minutes cold on a 2-core Xeon, about 48 at the Zen 3's speed
(docs/RESULTS.md). `:32` / `:64` as in the demo."""
import pathlib

from suti import config_lib


def get_config(arg=None):
  c = config_lib.load_config_file(pathlib.Path(__file__).with_name("demo.py"), arg)
  c.data.world.num_eval_subjects = 32
  c.experts.num_rounds = 12
  c.experts.prompts_per_subject = 2
  c.apprentice.guidance_mode = "image_first"
  c.apprentice.demo_guidance = 2.5
  c.apprentice.text_guidance = 1.5
  c.evaluate.num_subjects = c.data.world.num_eval_subjects  # every held-out subject
  c.evaluate.prompts_per_subject = 4
  return c
