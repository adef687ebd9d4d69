"""`python -m trainer.audio stats`: an alias of the audio tools, which live with their family
(models/ast/audio.py)."""
import sys

from models.ast.audio import main

if __name__ == "__main__":
    sys.exit(main())
