"""World base: pre-trains the base that configs/demo.py starts from (`embedded:world_base_16_v3`).

SuTI starts from a pre-trained text-to-image model. The demo's is shipped in the package
(suti/assets/world_base_16_v3, with asset.json saying how it was made), so the demo's minutes
go to SuTI itself: the experts, the apprentice and the evaluation. This config pre-trains
one like it from scratch, a cosine run over 16000 steps of 64 (about 2 hours on a 2-core
CPU at 130-160 images/s):

  python -m suti.launch --config=configs/world_base.py --workdir=W
  # then copy W/pretrain/checkpoints/N/ (without opt_state/) to suti/assets/NAME/N/

v3 itself was made in two legs: 5000 steps of a 5000-step cosine (world_base_16_v2), then,
with a fresh Adam state (benchmarks/continue_base.py), steps 5000-15000 of a 16000-step one.
It is the demo's pretrain section: v-prediction, the world text encoder frozen at its
initialisation, on the 16x16 world's 512 training subjects mixed with oracle renders of the
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
