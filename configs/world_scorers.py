"""World scorers: trains the world CLIP and world DINO that configs/demo.py ships
(`embedded:world_clip_16`, `embedded:world_dino_16`).

SuTI scores with a pre-trained CLIP (the delta-CLIP filter, CLIP-T, CLIP-I) and DINO. The
demo's are shipped in the package (suti/assets/, with asset.json saying how they were made),
as the base is, so the demo's minutes go to SuTI itself. This config remakes them, about
9 minutes on a 2-core CPU (training is deterministic: it remakes them byte for byte):

  python -m suti.launch --config=configs/world_scorers.py --workdir=W
  python -m suti.assets W   # copies W/clip and W/dino to suti/assets/world_{clip,dino}_16

It is the demo's clip and dino sections on the demo's 16x16 world. `--config.clip.path=`
`--config.dino.path=` (empty) trains them in the demo instead.
"""
import pathlib

from suti import config_lib


def get_config(arg=None):
  c = config_lib.load_config_file(pathlib.Path(__file__).with_name("demo.py"), arg)
  c.stages = "data,clip"
  c.clip.path = c.dino.path = ""
  return c
