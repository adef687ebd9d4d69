"""Hugging Face model directories, read (the trainer's base: families declare their importers
here, trainer/convert.py runs them).

`HFImporter`: how one architecture maps onto a family (a Task's `hf_importers`). Safetensors
files are read with a small memory-mapped reader (the format: an 8-byte little-endian header
length, a JSON header of {name: dtype, shape, data_offsets}, the raw little-endian data), one
tensor at a time (no torch, no copy of the file in memory).
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Callable

import numpy as np

from trainer.config import ConfigError

_SAFETENSORS_TYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64,
           "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


@dataclasses.dataclass(frozen=True)
class HFImporter:
    """How one Hugging Face architecture maps onto a family, both ways.

    config(hf_config: dict) -> the run's ConfigDict (a family config with the HF values);
    hf_config(config) -> the config.json of a run (ConfigError when the run's model is not of
    this architecture); tensors(config) -> {parameter name ('blocks/0/attn/q_proj/kernel'):
    (HF tensor name, to_ours, to_hf)}, the two layout maps of np.ndarrays. Parameters that name
    the same HF tensor are its slices along the last axis in our layout (after to_ours), in the
    map's order: a fused tensor (GPT-2's c_attn holds q, k and v) is split on import and
    concatenated on export, to_ours / to_hf (the first entry's) acting on the whole tensor.
    ignored: HF tensor names that carry nothing (e.g. a cached rotary inv_freq). base_prefix:
    transformers' base_model_prefix with its dot ('transformer.'), which the tensor names of a
    checkpoint saved from the bare base model lack (the hub's gpt2): import adds it then.
    A parameter held in several HF tensors names them as a tuple: to_ours(*their arrays) ->
    ours, to_hf(ours) -> a tuple in that order (AST's CLS and distillation tokens are one
    [1, 2, D] parameter here). ours_only: a regular expression over our parameter names the
    architecture has no tensor for: on import they keep their initial values, on export they
    are left out (ViTModel: the classifier)."""
    config: Callable
    hf_config: Callable
    tensors: Callable
    ignored: tuple[str, ...] = ()
    base_prefix: str = ""
    ours_only: str = ""


# ----------------------------------------------------------------------------- mapping kit
# what every architecture's map is made of (each family's importer module)
def same(w):
    """A tensor whose layout is ours (embeddings, norms, biases, Conv1D [in, out] weights)."""
    return w


def transpose(w):
    """nn.Linear's weight [out, in] <-> our kernel [in, out] (either way)."""
    return w.T


def norm_map(ours: str, hf: str) -> dict:
    """A LayerNorm: scale and bias."""
    return {f"{ours}/scale": (f"{hf}.weight", same, same),
            f"{ours}/bias": (f"{hf}.bias", same, same)}


def linear_map(ours: str, hf: str) -> dict:
    """An nn.Linear with a bias."""
    return {f"{ours}/kernel": (f"{hf}.weight", transpose, transpose),
            f"{ours}/bias": (f"{hf}.bias", same, same)}


def require(hf: dict, key: str, allowed: tuple, what: str, defaults: dict | None = None):
    """hf[key] (defaults[key], else allowed[0], when absent) if it is one of `allowed`, else a
    ConfigError naming the config.json key and what is supported."""
    value = hf.get(key, (defaults or {}).get(key, allowed[0]))
    if value not in allowed:
        raise ConfigError(f"import-hf: config.json {key}={value!r} is not supported for {what}; "
                          f"supported: {', '.join(map(repr, allowed))}")
    return value


# ----------------------------------------------------------------------------- safetensors
class SafeTensors:
    """The tensors of one .safetensors file, read on demand through a memory map."""

    def __init__(self, path: str):
        self.path = path
        try:
            with open(path, "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                header = json.loads(f.read(n))
        except (OSError, ValueError) as e:
            raise ConfigError(f"import-hf: {path!r} is not a readable safetensors file ({e})") \
                from None
        header.pop("__metadata__", None)
        self.header, self.offset = header, 8 + n

    def names(self) -> list[str]:
        return list(self.header)

    def __getitem__(self, name: str) -> np.ndarray:
        h = self.header[name]
        if h["dtype"] == "BF16":  # numpy has no bfloat16: widen the 16 bits to float32
            raw = self._raw(name, np.uint16, h["shape"])
            return (raw.astype(np.uint32) << 16).view(np.float32)
        if h["dtype"] not in _SAFETENSORS_TYPES:
            raise ConfigError(f"import-hf: {self.path}: tensor {name!r} has dtype {h['dtype']}; "
                              f"supported: BF16, {', '.join(_SAFETENSORS_TYPES)}")
        return self._raw(name, _SAFETENSORS_TYPES[h["dtype"]], h["shape"])

    def _raw(self, name, dtype, shape) -> np.ndarray:
        start, end = self.header[name]["data_offsets"]
        count = (end - start) // np.dtype(dtype).itemsize
        if count != int(np.prod(shape, dtype=np.int64)):
            raise ConfigError(f"import-hf: {self.path}: tensor {name!r} holds {count} values, its "
                              f"shape {shape} needs {int(np.prod(shape))}")
        return np.memmap(self.path, dtype=np.dtype(dtype).newbyteorder("<"), mode="r",
                         offset=self.offset + start, shape=tuple(shape))


def hf_tensors(hf_dir: str) -> dict[str, SafeTensors]:
    """{tensor name: the file holding it} of a model directory (one file or an index)."""
    index = os.path.join(hf_dir, "model.safetensors.index.json")
    single = os.path.join(hf_dir, "model.safetensors")
    if os.path.isfile(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        files = {}
        for shard in sorted(set(weight_map.values())):
            path = os.path.join(hf_dir, shard)
            if not os.path.isfile(path):
                raise ConfigError(f"import-hf: shard {path!r} named in {index!r} is missing")
            files[shard] = SafeTensors(path)
        return {name: files[shard] for name, shard in weight_map.items()}
    if os.path.isfile(single):
        st = SafeTensors(single)
        return {name: st for name in st.names()}
    raise ConfigError(f"import-hf: {hf_dir!r} has neither model.safetensors nor "
                      "model.safetensors.index.json (PyTorch .bin files: convert them to "
                      "safetensors first)")


def write_safetensors(path: str, tensors: dict[str, np.ndarray]) -> None:
    """Writes a .safetensors file (little-endian data in name order, the JSON header padded to
    8 bytes), atomically (temporary file + rename)."""
    kinds = {np.dtype(v): k for k, v in _SAFETENSORS_TYPES.items()}
    header, offset, arrays = {"__metadata__": {"format": "pt"}}, 0, []
    for name in sorted(tensors):
        a = np.ascontiguousarray(tensors[name])
        if a.dtype not in kinds:
            raise ConfigError(f"write_safetensors: tensor {name!r} has dtype {a.dtype}; "
                              f"supported: {', '.join(str(d) for d in kinds)}")
        a = a.astype(a.dtype.newbyteorder("<"), copy=False)
        header[name] = {"dtype": kinds[a.dtype.newbyteorder("=")], "shape": list(a.shape),
                        "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
        arrays.append(a)
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(len(head).to_bytes(8, "little"))
        f.write(head)
        for a in arrays:
            f.write(a.tobytes())
    os.replace(tmp, path)
