"""DreamBench: real photos from a folder in google/dreambooth's `dataset/` layout.

    python -m suti.launch --config=configs/dreambench.py --config.data.path=/path/to/dataset

Images are centre-cropped and resized to `image_size`; prompts come from
`prompts_and_classes.txt` (object or live-subject list by class).
"""
from suti import config_lib


def get_config(arg=None):
  del arg
  c = config_lib.base_config()
  c.image_size = 64
  c.model.attention_resolutions = (c.image_size // 4,)
  c.model.cross_attention_resolutions = (c.image_size // 2, c.image_size // 4)
  c.stages = "data"
  c.data.source = "dreambench"
  c.data.path = ""   # required: the DreamBench `dataset/` folder
  c.data.min_demos = 3
  c.data.max_demos = 10
  return c
