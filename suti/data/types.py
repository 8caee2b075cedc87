"""The one record every data source produces: a subject cluster."""
from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass
class SubjectCluster:
  """3-10 images of one subject with their captions, plus prompts it was never shown in.

  Attributes:
    subject_id: unique name of the subject within its dataset ('train-00007', 'dog2').
    class_name: the subject's class ('dog', 'ball'): what a caption may say about it.
    images: uint8 arrays [H, W, 3], RGB.
    captions: one caption per image.
    prompts: unseen prompts (SuTI's p_s): new contexts to draw the subject in.
    masks: bool arrays [H, W], the subject's pixels; only sources that know them (the world).
    spec: the world's JSON description of the subject, so its oracle can render any prompt
      from the dataset alone; empty for real photos.
  """
  subject_id: str
  class_name: str
  images: list[np.ndarray]
  captions: list[str]
  prompts: list[str]
  masks: list[np.ndarray] = dataclasses.field(default_factory=list)
  spec: str = ""

  def __post_init__(self):
    if len(self.images) != len(self.captions):
      raise ValueError(f"subject {self.subject_id!r}: {len(self.images)} images but "
                       f"{len(self.captions)} captions")
    if self.masks and len(self.masks) != len(self.images):
      raise ValueError(f"subject {self.subject_id!r}: {len(self.images)} images but "
                       f"{len(self.masks)} masks")
