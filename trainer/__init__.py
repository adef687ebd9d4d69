"""polyformer's generic trainer: `Trainer(config, workdir).fit()`.

The Python API (README "Python API"): Trainer, base_config / load_config, load_checkpoint (a
trained model and its config from a run directory) and generate (models.lm's KV-cached sampling).
Each name is imported on first use, so `import trainer.config` (or an attention layer that
needs nothing of the loop) does not start orbax, grain and tensorboardX.
"""
import importlib

import attention._xla_env  # noqa: F401  (an XLA:CPU workaround flag, set before jax starts)

_API = {
    "ConfigError": "trainer.config",
    "base_config": "trainer.config",
    "load_config": "trainer.cli",
    "load_checkpoint": "trainer.api",
    "Trainer": "trainer.trainer",
    # the language models' sampling: documented here since the first release; the LM family
    # owns it, and the generic trainer names no family, so it is found by name
    "generate": "models.lm",
}
__all__ = sorted(_API)


def __getattr__(name):
    if name not in _API:
        raise AttributeError(f"module 'trainer' has no attribute {name!r}")
    value = getattr(importlib.import_module(_API[name]), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_API))
