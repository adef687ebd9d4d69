"""`python -m trainer.prune`: an alias of AMP pruning, which lives with its family
(models/lm/prune.py)."""
import sys

from models.lm.prune import main

if __name__ == "__main__":
    sys.exit(main())
