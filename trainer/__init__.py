"""polyformer's generic trainer: `Trainer(config, workdir).fit()`."""
import attention._xla_env  # noqa: F401  (an XLA:CPU workaround flag, set before jax starts)
from trainer.config import ConfigError, base_config, load_config
from trainer.trainer import Trainer

__all__ = ["ConfigError", "Trainer", "base_config", "load_config"]
