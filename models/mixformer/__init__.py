"""MixFormer tracking: the model and its Task (model.py), GOT-10k / moving-shapes sequences,
crops and tracking metrics (tracking.py), the online tracker CLI (track.py; `python -m
trainer.track` is its alias). Importing the package registers the "mixformer" Task."""
from models.mixformer.model import *  # noqa: F401,F403  (the family's public names)
