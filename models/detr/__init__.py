"""Plain DETR with BoxRPB: the model and its Task (model.py), the Hungarian-matched set loss
(loss.py), COCO data and metrics (coco.py). Importing the package registers the "detr" Task."""
from models.detr.model import *  # noqa: F401,F403  (the family's public names)
