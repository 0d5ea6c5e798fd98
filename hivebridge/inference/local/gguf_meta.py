"""Read a GGUF file's metadata (no tensors) to estimate memory before loading it."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

_SCALARS = {
    0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
    10: "<Q", 11: "<q", 12: "<d",
}  # fmt: skip
_STRING, _ARRAY = 8, 9


class GGUFError(ValueError):
    pass


def _read(f: BinaryIO, n: int) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise GGUFError("truncated GGUF header")
    return data


def _string(f: BinaryIO) -> str:
    (n,) = struct.unpack("<Q", _read(f, 8))
    return _read(f, n).decode("utf-8", errors="replace")


def _value(f: BinaryIO, vtype: int, keep: bool) -> Any:
    if vtype in _SCALARS:
        fmt = _SCALARS[vtype]
        return struct.unpack(fmt, _read(f, struct.calcsize(fmt)))[0]
    if vtype == _STRING:
        return _string(f)
    if vtype == _ARRAY:
        itype, n = struct.unpack("<IQ", _read(f, 12))
        if itype in _SCALARS and not keep:
            f.seek(n * struct.calcsize(_SCALARS[itype]), 1)
            return None
        items = [_value(f, itype, keep) for _ in range(n)]
        return items if keep else None
    raise GGUFError(f"unknown GGUF value type {vtype}")


def read_metadata(path: Path) -> dict[str, Any]:
    """All scalar/string metadata; arrays (the vocabulary) are skipped."""
    with path.open("rb") as f:
        if _read(f, 4) != b"GGUF":
            raise GGUFError("no GGUF magic at the start")
        (version,) = struct.unpack("<I", _read(f, 4))
        if version < 2:
            raise GGUFError(f"GGUF version {version} is too old")
        _n_tensors, n_kv = struct.unpack("<QQ", _read(f, 16))
        meta: dict[str, Any] = {}
        for _ in range(n_kv):
            key = _string(f)
            (vtype,) = struct.unpack("<I", _read(f, 4))
            value = _value(f, vtype, keep=False)
            if value is not None:
                meta[key] = value
        return meta


#: ``general.file_type`` (llama.cpp's ``llama_ftype``) as the quantisation names people use.
FILE_TYPES = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K",
    11: "Q3_K_S", 12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S",
    17: "Q5_K_M", 18: "Q6_K", 19: "IQ2_XXS", 20: "IQ2_XS", 21: "Q2_K_S", 22: "IQ3_XS",
    23: "IQ3_XXS", 24: "IQ1_S", 25: "IQ4_NL", 26: "IQ3_S", 27: "IQ3_M", 28: "IQ2_S",
    29: "IQ2_M", 30: "IQ4_XS", 31: "IQ1_M", 32: "BF16", 36: "TQ1_0", 37: "TQ2_0",
}  # fmt: skip


@dataclass(frozen=True, slots=True)
class ModelShape:
    arch: str
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    n_ctx_train: int
    chat_template: str | None
    quantization: str = "?"

    def kv_bytes_per_token(self, bytes_per_value: int = 2) -> int:
        """K and V per token for all layers at f16 (the engine's cache type)."""
        head_dim = self.n_embd // max(1, self.n_head)
        return self.n_layer * 2 * self.n_head_kv * head_dim * bytes_per_value


def model_shape(path: Path) -> ModelShape:
    meta = read_metadata(path)
    arch = str(meta.get("general.architecture", "llama"))

    def geti(key: str, default: int) -> int:
        value = meta.get(f"{arch}.{key}", default)
        return int(value) if isinstance(value, int | float) else default

    n_head = geti("attention.head_count", 1)
    return ModelShape(
        arch=arch,
        n_layer=geti("block_count", 1),
        n_embd=geti("embedding_length", 1),
        n_head=n_head,
        n_head_kv=geti("attention.head_count_kv", n_head),
        n_ctx_train=geti("context_length", 2048),
        chat_template=meta.get("tokenizer.chat_template"),
        quantization=_file_type(meta.get("general.file_type")),
    )


def _file_type(value: Any) -> str:
    if isinstance(value, int) and not isinstance(value, bool):
        return FILE_TYPES.get(value, f"type {value}")
    return "?"
