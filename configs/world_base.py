"""World base: pre-trains the base that configs/demo.py starts from (`embedded:world_base_16`).

SuTI starts from a pre-trained text-to-image model. The demo's is shipped in the package
(suti/assets/world_base_16, with asset.json saying how it was made), so the demo's minutes
go to SuTI itself: the experts, the apprentice and the evaluation. This config
remakes it, about 45-60 minutes on a 2-core CPU:

  python -m suti.launch --config=configs/world_base.py --workdir=W
  # then copy W/pretrain/checkpoints/2500/ (without opt_state/) to suti/assets/world_base_16/

It is the demo's pretrain section: 2500 steps of 64 (160k images, cosine learning rate),
v-prediction, on the 16x16 world's 512 training subjects mixed with oracle renders of the
whole caption grammar (recolours, accessories, art styles) for 4096 training-split subjects,
as Imagen learnt those words before SuTI met a subject. A run with
`--config.pretrain.base_checkpoint=` (empty) pre-trains in the demo instead.
"""
import pathlib

from suti import config_lib


def get_config(arg=None):
  c = config_lib.load_config_file(pathlib.Path(__file__).with_name("demo.py"), arg)
  c.stages = "data,pretrain"
  c.pretrain.base_checkpoint = ""
  return c
