"""Reading GGUF files: metadata, the tensor index, and tensors dequantized to float32.

The `gguf` package (llama.cpp's own Python library) supplies the type tables and the dequantizers, but its
`GGUFReader` builds a numpy view for every array element and takes seconds to open a file with a 50K-token
vocabulary; this parser reads the same header in tens of milliseconds, which is most of a small model's load time.
"""

import math
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from camelid.errors import CamelidError, shown

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # ggml's GGML_MAX_DIMS
MAX_NAME_BYTES = 65535  # the longest key the GGUF specification allows (camelid holds tensor names to it too)
MAX_ELEMENTS = 1 << 40  # elements one tensor may have (the largest embeddings of released models: ~2**30)
# Items in all metadata arrays together, as Python lists ~8 times their bytes on disk: a 262K-token vocabulary's
# tokens, scores, types and merges are ~1M.
MAX_METADATA_ITEMS = 1 << 23

# GGUF metadata value types -> (struct format, numpy dtype) for the fixed-size ones.
_SCALARS = {
    0: ("<B", np.uint8),
    1: ("<b", np.int8),
    2: ("<H", np.uint16),
    3: ("<h", np.int16),
    4: ("<I", np.uint32),
    5: ("<i", np.int32),
    6: ("<f", np.float32),
    7: ("<?", np.bool_),
    10: ("<Q", np.uint64),
    11: ("<q", np.int64),
    12: ("<d", np.float64),
}
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # PyTorch order (outermost first); GGUF stores the reverse
    ggml_type: int
    offset: int  # absolute byte offset in the file


class GGUFFile:
    """A memory-mapped GGUF file: `metadata` (plain Python values) and `tensors` (name -> TensorInfo)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise CamelidError(f"{self.path}: no such GGUF file")
        with open(self.path, "rb") as f:
            try:
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            except ValueError:  # empty file
                raise CamelidError(f"{self.path}: the file is empty, not a GGUF model") from None
        try:
            self._parse()
        except (struct.error, IndexError, UnicodeDecodeError, ValueError, RecursionError):
            raise CamelidError(f"{self.path}: damaged GGUF header; the file is truncated or corrupt") from None

    # -- header --------------------------------------------------------------------------------------------
    # The file is untrusted: every count, length, type, dimension and offset is checked before it is used to
    # size anything, so that a damaged or hostile header is a one-line error, never a hang or a huge allocation.
    def _parse(self) -> None:
        buf = self._map
        if buf[:4] != GGUF_MAGIC:
            raise CamelidError(f"{self.path}: not a GGUF file (it does not start with 'GGUF')")
        version, n_tensors, n_kv = struct.unpack_from("<IQQ", buf, 4)
        if version not in (2, 3):
            raise CamelidError(f"{self.path}: GGUF version {version} is not supported (supported: 2, 3)")
        # the least a metadata entry (key length, type, one byte) and a tensor entry (name length, one dimension,
        # type, offset) can take
        if n_kv * 13 + n_tensors * 28 > len(buf) - 24:
            raise self._damaged(f"its header claims {n_kv:,} metadata entries and {n_tensors:,} tensors, more "
                                f"than a file of {len(buf):,} bytes holds")
        self._pos = 24
        self._items_left = MAX_METADATA_ITEMS
        self.metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = self._name("a metadata key")
            (vtype,) = self._unpack("<I")
            if key in self.metadata:
                raise self._damaged(f"metadata key {shown(key)} appears twice")
            self.metadata[key] = self._value(vtype, key)
        infos = [self._tensor_info() for _ in range(n_tensors)]
        alignment = self.metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if type(alignment) is not int or alignment < 1 or alignment & (alignment - 1):
            raise self._damaged(f"general.alignment is {alignment!r}, not a power of two")
        data_start = -(-self._pos // alignment) * alignment
        self.tensors = {}
        for name, shape, ggml_type, offset in infos:
            if name in self.tensors:
                raise self._damaged(f"tensor {shown(name)} appears twice")
            if offset % alignment:
                raise self._damaged(f"tensor {shown(name)} starts at offset {offset}, not a multiple of the alignment "
                                    f"{alignment}")
            self.tensors[name] = TensorInfo(name, shape, ggml_type, data_start + offset)
        end = data_start
        for info in sorted(self.tensors.values(), key=lambda t: t.offset):
            if info.offset < end:
                raise self._damaged(f"tensor {shown(info.name)}'s data overlaps the tensor before it")
            end = info.offset + self._nbytes(info)
            if end > len(buf):
                raise CamelidError(
                    f"{self.path}: tensor {shown(info.name)} runs past the end of the file; the file is truncated"
                )

    def _damaged(self, problem: str) -> CamelidError:
        return CamelidError(f"{self.path}: {problem}; the file is damaged or truncated")

    def _tensor_info(self) -> tuple[str, tuple[int, ...], int, int]:
        """One tensor's entry, checked: 1 to 4 dimensions of at least 1, a known type whose blocks fit the rows."""
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

        name = self._name("a tensor name")
        (n_dims,) = self._unpack("<I")
        if not 1 <= n_dims <= MAX_DIMS:
            raise self._damaged(f"tensor {shown(name)} has {n_dims} dimensions (GGUF allows 1 to {MAX_DIMS})")
        dims = self._unpack(f"<{n_dims}Q")
        ggml_type, offset = self._unpack("<IQ")
        if min(dims) < 1 or math.prod(dims) > MAX_ELEMENTS:  # Python's integers: no product wraps around
            raise self._damaged(f"tensor {shown(name)} has dimensions {list(dims)}")
        try:
            block = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)][0]
        except (ValueError, KeyError):
            raise self._damaged(f"tensor {shown(name)} has unknown GGML type {ggml_type}") from None
        if dims[0] % block:
            raise self._damaged(f"tensor {shown(name)}'s rows of {dims[0]} do not divide into its type's blocks of {block}")
        return name, tuple(int(d) for d in reversed(dims)), ggml_type, offset

    def _unpack(self, fmt: str) -> tuple:
        out = struct.unpack_from(fmt, self._map, self._pos)
        self._pos += struct.calcsize(fmt)
        return out

    def _name(self, what: str) -> str:
        """A key or tensor name: GGUF allows 65,535 bytes, and a longer one is a damaged length, not read."""
        (size,) = struct.unpack_from("<Q", self._map, self._pos)
        if size > MAX_NAME_BYTES:
            raise self._damaged(f"{what} at byte {self._pos} claims {size:,} bytes (GGUF allows {MAX_NAME_BYTES:,})")
        return self._string()

    def _string(self) -> str:
        return self._strings(1)[0]

    def _strings(self, n: int) -> list[str]:
        """n strings in a row (a vocabulary, its merges): one tight loop, for the ~100K of a tokenizer."""
        buf, pos, out = self._map, self._pos, []
        length = struct.Struct("<Q").unpack_from
        for _ in range(n):
            (size,) = length(buf, pos)
            text = buf[pos + 8 : pos + 8 + size]
            if len(text) != size:
                raise ValueError("string runs past the end of the file")
            out.append(text.decode("utf-8", errors="replace"))
            pos += 8 + size
        self._pos = pos
        return out

    def _value(self, vtype: int, key: str) -> Any:
        if vtype in _SCALARS:
            (v,) = self._unpack(_SCALARS[vtype][0])
            return v
        if vtype == _STRING:
            return self._string()
        if vtype == _ARRAY:
            item_type, n = self._unpack("<IQ")
            least = np.dtype(_SCALARS[item_type][1]).itemsize if item_type in _SCALARS else 8  # a string's length
            if n * least > len(self._map) - self._pos:
                raise self._damaged(f"metadata {shown(key)} claims {n:,} items, more than the rest of the file holds")
            self._items_left -= n
            if self._items_left < 0:
                raise self._damaged(f"its metadata arrays hold more than {MAX_METADATA_ITEMS:,} items (at {shown(key)})")
            if item_type in _SCALARS:
                dtype = np.dtype(_SCALARS[item_type][1]).newbyteorder("<")
                arr = np.frombuffer(self._map, dtype=dtype, count=n, offset=self._pos)
                self._pos += n * dtype.itemsize
                return arr.tolist()
            if item_type == _STRING:
                return self._strings(n)
            if item_type == _ARRAY:
                return [self._value(item_type, key) for _ in range(n)]
            vtype = item_type
        raise self._damaged(f"metadata {shown(key)} has unknown value type {vtype}")

    # -- tensors -------------------------------------------------------------------------------------------
    @staticmethod
    def _nbytes(info: TensorInfo) -> int:
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

        block, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType(info.ggml_type)]  # known: checked on reading
        return math.prod(info.shape) // block * block_bytes

    def raw(self, name: str) -> np.ndarray:
        """The tensor's bytes as stored (a uint8 view into the memory map)."""
        info = self.tensors[name]
        return np.frombuffer(self._map, dtype=np.uint8, count=self._nbytes(info), offset=info.offset)

    def dequantize(self, name: str, release: bool = False) -> torch.Tensor:
        """The tensor as float32 in PyTorch shape, whatever type it is stored in. With `release`, the pages of
        the file it was read from are let go afterwards, so that reading a whole model tensor by tensor does not
        keep the file resident as well (they come back from the page cache if read again).

        The block formats of most published files (Q8_0, Q4_0, Q4_1) are unpacked here in torch, several
        times faster than the `gguf` package's numpy code, which handles the rest.
        """
        try:
            return self._dequantize(name)
        finally:
            if release:
                self._release(self.tensors[name])

    def _release(self, info: TensorInfo) -> None:
        page = mmap.PAGESIZE
        start = info.offset // page * page
        end = info.offset + self._nbytes(info)
        if hasattr(self._map, "madvise") and hasattr(mmap, "MADV_DONTNEED"):  # Linux and most Unix; else kept
            self._map.madvise(mmap.MADV_DONTNEED, start, end - start)

    def blocks(self, name: str, types) -> tuple[np.ndarray, int] | None:
        """A matrix's blocks as stored (a view into the memory map) and its ggml type number, if that is one of
        `types` (ggml's numbers), for camelid's kernels to take as they are (native.Blocks); else None.
        `release(name)` lets the pages go afterwards."""
        info = self.tensors[name]
        if info.ggml_type not in types or len(info.shape) != 2:
            return None
        return self.raw(name), int(info.ggml_type)

    def release(self, name: str) -> None:
        """Let go of the pages of the file that tensor `name` was read from (they come back if read again)."""
        self._release(self.tensors[name])

    def _dequantize(self, name: str) -> torch.Tensor:
        from gguf import GGMLQuantizationType as Q
        from gguf.quants import dequantize

        info = self.tensors[name]
        qtype = Q(info.ggml_type)  # a known type: checked when the header was read
        raw = self.raw(name)
        if qtype == Q.F32:
            return torch.from_numpy(raw.view(np.float32).reshape(info.shape).copy())
        if qtype == Q.F16:
            return torch.from_numpy(raw.view(np.float16).reshape(info.shape).astype(np.float32))
        if qtype == Q.BF16:
            return torch.from_numpy((raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32).reshape(info.shape))
        fast = {Q.Q8_0: _q8_0, Q.Q4_0: _q4_0, Q.Q4_1: _q4_1}.get(qtype)
        if fast is not None:
            return fast(torch.from_numpy(raw.copy())).reshape(info.shape)
        rows = int(np.prod(info.shape[:-1], dtype=np.int64))
        try:
            out = dequantize(raw.reshape(rows, -1), qtype)
        except NotImplementedError:
            raise CamelidError(
                f"{self.path}: tensor {name} is stored as {qtype.name}, which the installed gguf package "
                "cannot dequantize; re-quantize the model to Q8_0, Q4_K or F16 with llama.cpp"
            ) from None
        return torch.from_numpy(np.asarray(out, dtype=np.float32).reshape(info.shape))


def _scale(blocks: torch.Tensor, at: int) -> torch.Tensor:
    """The little-endian float16 stored at byte `at` of every block, as float32 [n, 1]."""
    return blocks[:, at : at + 2].contiguous().view(torch.float16).float()


def _unpack_nibbles(qs: torch.Tensor) -> torch.Tensor:
    """16 packed bytes per block -> 32 floats 0..15: low nibbles are elements 0..15, high nibbles 16..31."""
    out = torch.empty(qs.shape[0], 32)
    out[:, :16] = qs & 0x0F
    out[:, 16:] = qs >> 4
    return out


def _q8_0(raw: torch.Tensor) -> torch.Tensor:  # block: f16 scale, 32 x int8
    blocks = raw.view(-1, 34)
    return blocks[:, 2:].contiguous().view(torch.int8).float().mul_(_scale(blocks, 0))


def _q4_0(raw: torch.Tensor) -> torch.Tensor:  # block: f16 scale, 16 bytes of 4-bit values offset by 8
    blocks = raw.view(-1, 18)
    return _unpack_nibbles(blocks[:, 2:]).sub_(8).mul_(_scale(blocks, 0))


def _q4_1(raw: torch.Tensor) -> torch.Tensor:  # block: f16 scale, f16 minimum, 16 bytes of 4-bit values
    blocks = raw.view(-1, 20)
    return _unpack_nibbles(blocks[:, 4:]).mul_(_scale(blocks, 0)).add_(_scale(blocks, 2))
