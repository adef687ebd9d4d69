"""polyformer's generic trainer: `Trainer(config, workdir).fit()`."""
from trainer.config import ConfigError, base_config, load_config
from trainer.trainer import Trainer

__all__ = ["ConfigError", "Trainer", "base_config", "load_config"]
