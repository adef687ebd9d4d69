"""The language model: the model, its Task and decoding (model.py), AMP pruning (prune.py;
`python -m trainer.prune` is its alias). Importing the package registers the "lm" Task."""
from models.lm.model import *  # noqa: F401,F403  (the family's public names)
