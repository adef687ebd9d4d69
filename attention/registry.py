"""The attention registry: `model.attention` (a config name) -> an NNX module class.

Families build attention only through `build(name, ...)`, so a new mechanism is a new file in
attention/ that registers itself; no family changes.

Self-attention modules share one call shape:
    module(x [B, T, D], *, positions [B, T] int32, cache=None, mode="train"|"prefill"|"decode")
        -> (y [B, T, D], cache)
and a constructor `Module(model_config, *, dtype, rngs)` reading the fields it needs from the
family's `config.model` (d_model, num_heads, num_kv_heads, head_dim, ...), plus
`init_cache(batch, max_len, dtype) -> cache` for generation.

Mechanism options. A mechanism declares its own config.model fields once, in its class's
`CONFIG_DEFAULTS`, namespaced by the class's `OPTION_PREFIX` (every key starts with
`<prefix>_`, no two classes share a prefix or a key, so two mechanisms cannot collide; a
subclass inherits its bases' options, e.g. every SoftmaxAttention subclass has softmax_impl).
`add_options(config.model)` adds them to a config (the trainer's config pipeline does, before
command-line overrides apply); `read_options(cls, cfg)` is the one place they are read and
checked: the declared type, the bounds in the classes' `OPTION_RULES` (attention/fields.py,
e.g. {"gla_chunk": ">= 1", "gla_impl": ("auto", "pallas", "xla", "reference")}), then each
class's `validate_options(opts, cfg)` for what involves other fields; so a constructor and the
pipeline's up-front `check_options(config.model)` report the same errors.

Capabilities: `names(bidirectional=True)` lists the mechanisms that honour model.causal=False
(the class attribute BIDIRECTIONAL), which the vision families' encoders need.
"""
from __future__ import annotations

import importlib
import importlib.util

from attention import fields

_REGISTRY: dict[str, type] = {}
# mechanisms living in their own modules are imported on first use, keeping start-up light
_MODULES = {name: f"attention.{name}" for name in (
    "softmax", "gla", "hedgehog",
    "routing", "landmark", "hip", "flexprefill", "dhsa", "ssa",  # sparse (block_sparse_attention)
    "moh", "complexformer",  # head-level (Mixture-of-Head) and positional (complex phase)
    "act",  # inference-time attention calibration (a SoftmaxAttention subclass)
    "stdha",  # video: some heads read a neighbouring frame (ZeroI2V), zero parameters
)}


def register(name: str):
    def deco(cls):
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"attention {name!r} registered twice")
        _REGISTRY[name] = cls
        return cls
    return deco


def _available(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def names(*, bidirectional: bool | None = None) -> list[str]:
    """The registered mechanisms; bidirectional=True: only those that honour model.causal=False
    (their class sets BIDIRECTIONAL), False: only the causal-only ones."""
    out = sorted(set(_REGISTRY) | {n for n, m in _MODULES.items() if _available(m)})
    if bidirectional is not None:
        out = [n for n in out if bool(getattr(get(n), "BIDIRECTIONAL", False)) == bidirectional]
    return out


def get(name: str) -> type:
    if name not in _REGISTRY and name in _MODULES and _available(_MODULES[name]):
        importlib.import_module(_MODULES[name])
    if name not in _REGISTRY:
        raise KeyError(f"unknown attention {name!r}; registered: {', '.join(names())}")
    return _REGISTRY[name]


def build(name: str, model_config, *, dtype, rngs, layer: int | None = None):
    """The mechanism `name` built from `model_config`. `layer`: the block's depth (0-based),
    for mechanisms that behave per layer (ACT calibrates chosen (layer, head) pairs): they
    define `set_layer(layer)`; the others ignore it."""
    module = get(name)(model_config, dtype=dtype, rngs=rngs)
    if layer is not None and hasattr(module, "set_layer"):
        module.set_layer(layer)
    return module


# ----------------------------------------------------------------------------- options
def option_defaults(cls: type) -> dict:
    """The config.model fields mechanism class `cls` reads, with their defaults: the
    CONFIG_DEFAULTS of its bases, then its own."""
    out = {}
    for klass in reversed(cls.__mro__):
        out.update(klass.__dict__.get("CONFIG_DEFAULTS", {}))
    return out


def _field(cfg, key):
    """cfg's value of `key`, or _MISSING: cfg is a ConfigDict, a dict or any namespace (tests
    and notebooks build layers from plain objects)."""
    if isinstance(cfg, dict) or hasattr(cfg, "keys"):
        return cfg[key] if key in cfg.keys() else _MISSING
    return getattr(cfg, key, _MISSING)


_MISSING = object()


def _check_type(key: str, value, default):
    if isinstance(default, bool):
        ok = isinstance(value, (bool, int)) and value in (0, 1)
        value = bool(value)
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool) or (
            isinstance(value, float) and value.is_integer())
        value = int(value) if ok else value
        kind = "an integer"
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
        kind = "a number"
    elif isinstance(default, str):
        ok, kind = isinstance(value, str), "a string"
    elif isinstance(default, (tuple, list)):
        ok, kind = isinstance(value, (tuple, list, str)), "a list (or a comma-separated string)"
        value = tuple(value) if isinstance(value, list) else value
    else:
        ok = True
    if not ok:
        kind = "true or false" if isinstance(default, bool) else kind
        raise ValueError(f"config.model.{key}={value!r}: expected {kind} (default {default!r})")
    return value


def option_rules(cls: type) -> dict:
    """{option: rule} (attention/fields.py) of mechanism class `cls`: the OPTION_RULES of its
    bases, then its own."""
    out = {}
    for klass in reversed(cls.__mro__):
        out.update(klass.__dict__.get("OPTION_RULES", {}))
    return out


def read_options(cls: type, cfg) -> dict:
    """{field: value} of every option `cls` declares (option_defaults): cfg's value where it has
    one, else the default; each value checked against its default's type and its declared
    bounds (option_rules), then by each class's own `validate_options(opts, cfg)` (bases
    first). Raises ValueError naming the field."""
    opts = {}
    for key, default in option_defaults(cls).items():
        value = _field(cfg, key)
        opts[key] = default if value is _MISSING else _check_type(key, value, default)
    fields.check_all(opts, option_rules(cls), prefix="model.")
    for klass in reversed(cls.__mro__):
        check = klass.__dict__.get("validate_options")
        if check is not None:
            check.__func__(opts, cfg) if isinstance(check, staticmethod) else check(opts, cfg)
    return opts


def set_options(module, cfg, prefix: str) -> dict:
    """read_options(type(module), cfg), and each option `<prefix>_<name>` set as module.<name>
    (e.g. ssa_keep_ratio -> module.keep_ratio); returns all the options."""
    opts = read_options(type(module), cfg)
    for key, value in opts.items():
        if key.startswith(prefix + "_"):
            setattr(module, key[len(prefix) + 1:], value)
    return opts


def add_options(model_config) -> None:
    """Adds the options of model_config.attention's mechanism to model_config (an unlocked or
    locked ConfigDict), keeping values already set; an unknown mechanism is left for
    check_options to report."""
    try:
        cls = get(model_config.attention)
    except KeyError:
        return
    missing = {k: v for k, v in option_defaults(cls).items() if k not in model_config}
    if not missing:
        return
    unlocked = getattr(model_config, "unlocked", None)
    if unlocked is None:
        model_config.update(missing)
        return
    with unlocked():
        for k, v in missing.items():
            model_config[k] = v


def layer_config(model_config, **fields):
    """A copy of a family's config.model (a ConfigDict, dict or namespace) with some fields
    replaced, as the config a mechanism is built from: e.g. a hierarchical backbone's stage
    width, or a detector encoder's causal=False and no RoPE. Every other field, the mechanism's
    options included, is kept."""
    import ml_collections  # a dependency of the trainer; the layers themselves need no config type

    base = model_config.to_dict() if hasattr(model_config, "to_dict") else (
        dict(model_config) if isinstance(model_config, dict) else dict(vars(model_config)))
    return ml_collections.ConfigDict({**base, **fields})


def check_options(model_config) -> None:
    """Raises ValueError when model_config.attention names no mechanism or its options are bad
    (read_options' checks), before any model is built."""
    try:
        cls = get(model_config.attention)
    except KeyError as e:
        raise ValueError(f"config.model.attention: {e.args[0]}") from None
    read_options(cls, model_config)
