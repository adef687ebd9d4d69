"""Audio Spectrogram Transformer with PETL: the model and its Task (model.py), the Kaldi fbank
front end, WAV / ESC-50 / synthetic clips and `stats` (audio.py; `python -m trainer.audio` is its
alias). Importing the package registers the "ast" Task."""
from models.ast.model import *  # noqa: F401,F403  (the family's public names)
