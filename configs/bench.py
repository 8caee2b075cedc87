"""Bench: the demo's pipeline at 3x the expert subjects and 3x the apprentice steps (issue 7).

`python -m suti.launch --config=configs/bench.py`: the 16x16 world, shipped base and scorers
of configs/demo.py, with
- 12 rounds of 8 experts (96 training subjects, 2 unseen prompts each, ~360 admitted
  pseudo-targets) where the demo has 4 rounds (32 subjects, 4 prompts each). On one demo
  buffer's held-out images, 64 subjects instead of 32 lifted SuTI's CLIP-I from 0.416 to 0.453
  at the same DINO: the apprentice learns to copy from how many subjects it saw, not from how
  many samples of each (docs/RESULTS.md, issue 7);
- 3000 apprentice steps where the demo trains 1000: on this buffer (512 held-out images,
  paired over subjects) SuTI's DINO went from 0.065 under the experts' to 0.012 under, its
  CLIP-I from 0.041 under to 0.018 under; 6000 steps gained nothing more;
- SuTI sampled with separate demo and text guidance (`image_first`, demos 2.5, text 1.25):
  text 1.5 left SuTI 0.002 above the experts' CLIP-T and 0.018 under their CLIP-I, 1.0 met
  their CLIP-I and fell 0.023 under their CLIP-T, 1.25 is within 0.01 of it;
- evaluation on 32 held-out subjects x 4 prompts x 4 images (512 images a row; 128 left
  the comparison inside the seed noise), without the 1-4 demo curve (the demo draws it; at
  512 images it would add ~20 minutes).

The demo keeps 32 subjects and 1000 steps to stay under 20 minutes on the slowest 2-core CPU
measured; the bench's stages took about 47 minutes on a 2-core Xeon, about 80 at the Zen
3's speed (docs/RESULTS.md). `:32` / `:64` as in the demo."""
import pathlib

from suti import config_lib


def get_config(arg=None):
  c = config_lib.load_config_file(pathlib.Path(__file__).with_name("demo.py"), arg)
  c.data.world.num_eval_subjects = 32
  c.experts.num_rounds = 12
  c.experts.prompts_per_subject = 2
  c.apprentice.num_steps = 3000
  c.apprentice.guidance_mode = "image_first"
  c.apprentice.demo_guidance = 2.5
  c.apprentice.text_guidance = 1.25
  c.evaluate.num_subjects = c.data.world.num_eval_subjects  # every held-out subject
  c.evaluate.prompts_per_subject = 4
  c.evaluate.images_per_prompt = 4
  c.evaluate.max_demos = 0
  return c
