"""polyformer's generic trainer: `Trainer(config, workdir).fit()`.

The Python API (README "Python API"): Trainer, base_config / load_config, load_checkpoint (a
trained model and its config from a run directory) and generate (models.lm's KV-cached sampling).
"""
import attention._xla_env  # noqa: F401  (an XLA:CPU workaround flag, set before jax starts)
from trainer.api import load_checkpoint
from trainer.config import ConfigError, base_config, load_config
from trainer.trainer import Trainer

__all__ = ["ConfigError", "Trainer", "base_config", "generate", "load_checkpoint", "load_config"]


def __getattr__(name):
    # models.lm imports trainer's modules: importing it here eagerly would be circular when
    # `import models.lm` comes first, so `trainer.generate` is resolved on first use
    if name == "generate":
        from models.lm import generate
        return generate
    raise AttributeError(f"module 'trainer' has no attribute {name!r}")
