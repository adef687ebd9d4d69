"""`python -m trainer.track`: an alias of the online tracker, which lives with its family
(models/mixformer/track.py)."""
import sys

from models.mixformer.track import main

if __name__ == "__main__":
    sys.exit(main())
