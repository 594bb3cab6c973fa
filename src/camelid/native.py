"""camelid's own CPU kernels (native.c): int8 and 4-bit weights, their activations rounded to int8 per 32 inside
the products (for int8 weights, to int16 per row when 2 to PANEL_MIN - 1 rows share a call or a row is not a
multiple of SCALE_BLOCK long), and the decoder's layers in one call.

The C source ships with the package and is compiled with the machine's C compiler the first time it is needed
(~2 s), into camelid's cache directory ($CAMELID_CACHE, else $XDG_CACHE_HOME/camelid, else ~/.cache/camelid),
once per instruction-set path (AVX-512 with VNNI, AVX-VNNI, AVX2, plain C), keyed by the source, the compiler and
the CPU. The best path the CPU runs is used unless $CAMELID_ISA names another (the tests run each one the
machine has). It is loaded with ctypes: no Python headers, no build step at install time.
"""

import contextlib
import ctypes
import dataclasses
import functools
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
import threading
import types
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from camelid.errors import CamelidError
from camelid.files import cache_dir

SOURCE = Path(__file__).with_name("native.c")
NO_COMPILER = ("camelid's int8 kernels need a C compiler and none was found: install gcc or clang (or set CC), "
               "or use --quantize f16")
SCALE_BLOCK = 64  # int8 weights per scale along a row (native.c's SCALE_BLOCK)
Q4_BLOCK = 32  # 4-bit weights per float16 (scale, offset) pair along a row (native.c's Q4_BLOCK)
PANEL_MIN = 16  # from this many input rows in one call, int8 products take int8 inputs in panels (native.c), as one
# row does read straight from the weights (bit-identical); 2 to PANEL_MIN - 1 rows take int16 inputs
Q4_ROWS = 8  # 4-bit weight rows interleaved in one group (native.c's Q4_ROWS)
# (-ffp-contract=off: a multiply and an add stay two roundings unless the code asks for a fused one, so that every
# path rounds the scalar code alike: the 4-bit quantizer's blocks are the same bytes on each)
FLAGS = ["-O3", "-std=gnu11", "-shared", "-fPIC", "-pthread", "-ffp-contract=off"]
ISA_VARIABLE = "CAMELID_ISA"  # names the instruction-set path to use instead of the best this CPU has
# The kernels' paths on x86-64, best first: each the compiler flags it is built with and the CPU flags
# (/proc/cpuinfo's) it needs. The AVX-512 path runs the same 256-bit code with AVX-512's 32 registers and its
# VNNI dot products (vpdpbusd); AVX-VNNI is the same instruction on CPUs without AVX-512; AVX2 multiplies the
# bytes with vpmaddubsw and vpmaddwd instead; "generic" is the plain C loops the others fall back to at their
# edges, for any x86-64. Elsewhere (ARM) one path: the compiler's -march=native.
X86_ISAS = {
    "avx512-vnni": (["-mavx2", "-mfma", "-mf16c", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq",
                     "-mavx512vnni"], {"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq",
                                       "avx512_vnni"}),
    "avx-vnni": (["-mavx2", "-mfma", "-mf16c", "-mavxvnni"], {"avx2", "fma", "f16c", "avx_vnni"}),
    "avx2": (["-mavx2", "-mfma", "-mf16c"], {"avx2", "fma", "f16c"}),
    "generic": ([], set()),
}


def compiler() -> list[str] | None:
    """The command that compiles C: $CC (which may hold arguments, e.g. "ccache gcc") if it names a program on
    the PATH, else cc, gcc or clang; None if there is none."""
    if os.environ.get("CC"):
        command = shlex.split(os.environ["CC"])
        return command if command and shutil.which(command[0]) else None
    return next(([c] for c in ("cc", "gcc", "clang") if shutil.which(c)), None)


def _cpu_id() -> str:
    """What -march=native depends on: the CPU's model and feature flags (Linux), else what platform knows."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return "\n".join(sorted({ln for ln in lines if ln.startswith(("flags", "model name", "Features"))}))
    except OSError:
        return platform.processor() + platform.machine()


def _is_x86() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64")


@functools.cache
def _cpu_flags() -> frozenset[str]:
    try:
        return frozenset(next((ln.split(":", 1)[1].split() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                               if ln.startswith("flags")), []))
    except OSError:
        return frozenset()


def available_isas() -> list[str]:
    """The kernels' instruction-set paths this CPU runs, best first (on x86-64 at least "generic"; where the CPU's
    flags cannot be read, "native": the compiler's -march=native)."""
    if not _is_x86():
        return ["native"]
    if not _cpu_flags():
        return ["native", "generic"]
    return [name for name, (_, needs) in X86_ISAS.items() if needs <= _cpu_flags()]


def chosen_isa() -> str:
    """The path the kernels use: $CAMELID_ISA where set (one of available_isas()), else the best this CPU has
    (library() falls back to the next where the compiler cannot build it)."""
    isas, wanted = available_isas(), os.environ.get(ISA_VARIABLE, "")
    if wanted and wanted not in isas:
        raise CamelidError(f"{ISA_VARIABLE}={wanted} is not a path this CPU runs; choose one of: {', '.join(isas)} "
                           f"(or unset {ISA_VARIABLE})")
    return wanted or isas[0]


@functools.cache
def library(isa: str | None = None) -> ctypes.CDLL:
    """The compiled kernels for instruction-set path `isa` (default: $CAMELID_ISA, else the best path this CPU
    runs that the compiler builds: one too old for a path's instructions falls back to the next), built first if
    this machine has no copy yet (CamelidError if it cannot be built). `.isa` on the result names the path."""
    cc = compiler()
    if cc is None:
        raise CamelidError(NO_COMPILER)
    if isa is not None or os.environ.get(ISA_VARIABLE):
        isa = isa or chosen_isa()
        if isa not in available_isas():
            raise CamelidError(f"{isa!r} is not an instruction-set path this CPU runs; choose one of: "
                               f"{', '.join(available_isas())}")
        return _build(cc, isa)
    for candidate in available_isas():
        try:
            return _build(cc, candidate)
        except CamelidError as exc:
            error = exc
    raise error


def _build(cc: list[str], isa: str) -> ctypes.CDLL:
    # (-mtune: scheduled for this CPU; the instructions are the path's alone)
    flags = [*FLAGS, *(X86_ISAS[isa][0] + ["-mtune=native"] if isa in X86_ISAS else ["-march=native"])]
    source = SOURCE.read_bytes()
    key = hashlib.sha256(b"\0".join([source, " ".join(cc).encode(), " ".join(flags).encode(), _cpu_id().encode()]))
    path = cache_dir() / f"native-{isa}-{key.hexdigest()[:16]}.so"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=path.parent)
        os.close(fd)
        try:
            try:
                done = subprocess.run([*cc, *flags, "-o", tmp, str(SOURCE), "-lm"], capture_output=True, text=True)
                first = (done.stderr.strip().splitlines() or ["no message"])[0]
            except OSError as e:
                done, first = None, str(e)
            if done is None or done.returncode != 0:
                raise CamelidError(f"building camelid's kernels ({isa} path) with {' '.join(cc)} failed ({first}); "
                                   f"set CC to another compiler or {ISA_VARIABLE} to another path, or use "
                                   "--quantize f16")
            os.replace(tmp, path)  # atomic: a concurrent build of the same source writes the same file
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    lib = ctypes.CDLL(str(path))
    ptr, i32 = ctypes.c_void_p, ctypes.c_int
    lib.camelid_linear.argtypes = [ptr, ptr, ptr, i32, i32, i32, i32, ptr, i32, ptr, i32]
    lib.camelid_linear.restype = i32
    lib.camelid_quantize_rows.argtypes = [ptr, i32, i32, ptr, ptr, i32]
    lib.camelid_quantize_rows.restype = None
    lib.camelid_quantize_rows4.argtypes = [ptr, i32, i32, ptr, i32]
    lib.camelid_quantize_rows4.restype = None
    lib.camelid_pack4.argtypes = [ptr, i32, i32, i32, ptr, ptr, ptr, i32, i32]
    lib.camelid_pack4.restype = i32
    lib.camelid_quantize_stored_rows.argtypes = [ptr, i32, i32, i32, ptr, ptr, ptr, i32]
    lib.camelid_quantize_stored_rows.restype = i32
    lib.camelid_decoder_forward.argtypes = [ptr, i32, ptr, ptr, ptr, ptr, ptr, ptr, ptr, i32, ptr, i32]
    lib.camelid_decoder_forward.restype = i32
    for size, name in ((ctypes.sizeof(_Layer), "camelid_sizeof_layer"),
                       (ctypes.sizeof(_Decoder), "camelid_sizeof_decoder"), (SCALE_BLOCK, "camelid_scale_block"),
                       (Q4_BLOCK, "camelid_q4_block"), (Q4_ROWS, "camelid_q4_rows"),
                       (PANEL_MIN, "camelid_panel_min"), (_QMatrix.pairs.offset, "camelid_offset_pairs")):
        if getattr(lib, name)() != size:
            raise CamelidError(f"camelid's int8 kernels in {path} do not match this camelid; delete the file")
    lib.isa = isa
    return lib


def _ptr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def quantize_rows(weight: "Tensor | Blocks", q: Tensor | None = None,
                  scale: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """int8 weights [out, in] and float32 scales [out, ceil(in / SCALE_BLOCK)]: each block of SCALE_BLOCK weights
    along a row gets max |block| / 127, rounding to nearest (see `dequantize`). `weight` is a float tensor, or
    Blocks of an EXACT type, made int8 a row at a time exactly as from their dequantized floats.

    Written into `q` and `scale` when given (contiguous, e.g. rows of a larger matrix).
    """
    stored = isinstance(weight, Blocks)
    if stored:
        shape = (weight.rows, weight.cols)
        if weight.type not in EXACT:
            raise ValueError(f"int8 weights are made from blocks of ggml types {EXACT}, not {weight.type}")
    else:
        if weight.device.type != "cpu" or weight.dim() != 2:
            raise ValueError(f"int8 weights are made from a 2-D CPU tensor, not {tuple(weight.shape)} on "
                             f"{weight.device}")
        weight = weight.detach().float().contiguous()
        shape = tuple(weight.shape)
    blocks = -(-shape[1] // SCALE_BLOCK)
    q = torch.empty(shape, dtype=torch.int8) if q is None else q
    scale = torch.empty(shape[0], blocks) if scale is None else scale
    if not (q.dtype == torch.int8 and scale.dtype == torch.float32 and q.is_contiguous() and scale.is_contiguous()
            and q.shape == shape and scale.shape == (shape[0], blocks)):
        raise ValueError(f"quantize_rows writes into contiguous int8 {shape} and float32 {(shape[0], blocks)} "
                         "tensors")
    lib, threads = library(), torch.get_num_threads()
    if stored:
        order = None if weight.rows_from is None else weight.rows_from.to(torch.int32).contiguous()
        if lib.camelid_quantize_stored_rows(_address(weight.raw), weight.type, *shape, _ptr(order), q.data_ptr(),
                                            scale.data_ptr(), threads) != 0:
            raise MemoryError("camelid's int8 kernels could not allocate a row's scratch memory")
    else:
        lib.camelid_quantize_rows(weight.data_ptr(), *shape, q.data_ptr(), scale.data_ptr(), threads)
    return q, scale


def _address(raw) -> int:
    """The address of a tensor's or numpy array's first byte."""
    return raw.data_ptr() if isinstance(raw, Tensor) else raw.ctypes.data


def dequantize(q: Tensor, scale: Tensor) -> Tensor:
    """The float32 weights that int8 `q` [out, in] with block scales `scale` [out, blocks] stand for."""
    return q.float() * scale.repeat_interleave(SCALE_BLOCK, dim=1)[:, : q.shape[1]]


Q4_0, Q4_1, Q8_0, Q4_K = 2, 3, 8, 12  # ggml's numbers for the block types the kernels read
FOUR_BIT = (Q4_0, Q4_1, Q4_K)  # what camelid_pack4 repacks for the 4-bit kernels
EXACT = (Q8_0, Q4_0, Q4_1)  # what camelid_quantize_stored_rows makes int8 from, as from the dequantized floats


@dataclasses.dataclass
class Blocks:
    """A [rows, cols] weight as rows of llama.cpp's blocks (`type` ggml's number: FOUR_BIT for Int4Linear to
    repack, EXACT for int8) in `raw` (a uint8 numpy array or tensor, e.g. a view into a GGUF file's memory map);
    its row r is raw's row rows_from[r] (None: r). `name`: the file's tensor it came from, if any."""

    raw: Any
    type: int
    rows: int
    cols: int
    rows_from: Tensor | None = None
    name: str = ""

    def __post_init__(self):
        """The kernels read raw memory: refuse what would make them read past it."""
        block = {Q8_0: (32, 34), Q4_0: (32, 18), Q4_1: (32, 20), Q4_K: (256, 144)}.get(self.type)
        if block is None or self.cols <= 0 or self.cols % block[0]:
            raise ValueError(f"blocks of ggml type {self.type} cannot hold rows {self.cols} wide")
        size = self.raw.numel() if isinstance(self.raw, Tensor) else self.raw.nbytes
        have = size // (self.cols // block[0] * block[1])  # rows of blocks
        order = self.rows_from
        if have < (self.rows if order is None else 1) or (order is not None and (
                order.shape != (self.rows,) or int(order.min()) < 0 or int(order.max()) >= have)):
            raise ValueError(f"{have} rows of blocks cannot give {self.rows} rows in this order")
        if not (self.raw.is_contiguous() if isinstance(self.raw, Tensor) else self.raw.flags["C_CONTIGUOUS"]):
            raise ValueError("blocks must be contiguous in memory")


def quantize_rows4(weight: Tensor) -> Blocks:
    """`weight` [out, in] (in a multiple of Q4_BLOCK) rounded to 4 bits as Q4_1 blocks: per 32 weights along a
    row, 4-bit codes q and a float16 pair (d, m) fitted by weighted least squares, each weight d q + m."""
    if weight.device.type != "cpu" or weight.dim() != 2 or weight.shape[1] % Q4_BLOCK:
        raise ValueError(f"4-bit weights are made from a 2-D CPU tensor whose rows are a multiple of {Q4_BLOCK} "
                         f"wide, not {tuple(weight.shape)} on {weight.device}")
    w = weight.detach().float().contiguous()
    out, width = w.shape
    raw = torch.empty(out, width // Q4_BLOCK * 20, dtype=torch.uint8)
    library().camelid_quantize_rows4(w.data_ptr(), out, width, raw.data_ptr(), torch.get_num_threads())
    return Blocks(raw, Q4_1, out, width)


def rows4(blocks: Blocks) -> tuple[Tensor, Tensor]:
    """4-bit blocks as rows: codes two to a byte [rows, cols / 2] (per 32 weights, 16 bytes whose low nibbles are
    weights 0..15 and high nibbles 16..31) and float16 (d, m) pairs [rows, cols / 32, 2]."""
    layer = Int4Linear([blocks])
    return deinterleave4(layer.qweight, layer.scale)


def unpack4(q: Tensor) -> Tensor:
    """The 4-bit codes 0..15 packed in `q` [out, in / 2] as uint8 [out, in], in the weights' order."""
    blocks = q.view(q.shape[0], -1, Q4_BLOCK // 2)
    return torch.cat([blocks & 0x0F, blocks >> 4], dim=2).view(q.shape[0], -1)


def pack4(codes: Tensor) -> Tensor:
    """`unpack4` undone: codes 0..15 [out, in] packed two to a byte [out, in / 2]."""
    blocks = codes.to(torch.uint8).view(codes.shape[0], -1, Q4_BLOCK)
    return (blocks[:, :, : Q4_BLOCK // 2] | (blocks[:, :, Q4_BLOCK // 2 :] << 4)).reshape(codes.shape[0], -1)


def dequantize4(q: Tensor, dm: Tensor) -> Tensor:
    """The float32 weights that 4-bit codes `q` [out, in / 2] with (d, m) pairs `dm` [out, in / 32, 2] stand for."""
    pairs = dm.float().repeat_interleave(Q4_BLOCK, dim=1)
    return unpack4(q).float() * pairs[..., 0] + pairs[..., 1]


def deinterleave4(packed: Tensor, pairs: Tensor) -> tuple[Tensor, Tensor]:
    """The kernels' layout of 4-bit weights (Int4Linear's: groups of Q4_ROWS rows, each block of a group 128
    bytes, in which load L of 4 x 32 bytes holds 4 weights of each row in turn, weights 4L..4L+3 in the low
    nibbles and 16+4L..16+4L+3 in the high ones; pairs [groups, blocks, (d, m), Q4_ROWS], or [.., (d,), ..]
    for m = -8 d) back in rows: codes [out, in / 2] and pairs [out, in / 32, 2]."""
    if pairs.shape[2] == 1:
        pairs = torch.cat([pairs, pairs * -8], dim=2)  # exact in float16
    groups, blocks = pairs.shape[0], pairs.shape[1]
    v = packed.view(groups, blocks, 4, Q4_ROWS, 4)  # group, block, load, row, weight
    codes = torch.stack([v & 0x0F, v >> 4], dim=2)  # group, block, half, load, row, weight
    codes = codes.permute(0, 4, 1, 2, 3, 5).reshape(groups * Q4_ROWS, blocks * Q4_BLOCK)
    return pack4(codes), pairs.permute(0, 3, 1, 2).reshape(groups * Q4_ROWS, blocks, 2)


class Int8Embedding(nn.Module):
    """Token embeddings stored as int8 rows (a scale per SCALE_BLOCK weights, as Int8Linear's), widened to float32
    as they are looked up: a quarter of float32's memory. `shared`: the int8 output head tied to them, whose
    weights they are. `weight` is an empty float32 tensor that says the device and dtype, as an nn.Embedding's
    weight would to the code that asks."""

    def __init__(self, weight: "Tensor | Blocks", shared: "Int8Linear | None" = None):
        """`weight` [vocabulary, width]: a float tensor, or Blocks of a type quantize_rows takes."""
        super().__init__()
        q, scale = (shared.qweight, shared.scale) if shared is not None else quantize_rows(weight)
        self.register_buffer("qweight", q)
        self.register_buffer("scale", scale)
        self.register_buffer("weight", torch.empty(0, q.shape[1]))

    def forward(self, ids: Tensor) -> Tensor:
        flat = ids.reshape(-1)
        return dequantize(self.qweight[flat], self.scale[flat]).view(*ids.shape, -1)


class QuantLinear(nn.Module):
    """A linear layer whose weights camelid's kernels multiply as they are stored (int8 or 4-bit); activations
    are rounded to int8 per 32 (for int8 weights, to int16 per row when 2 to PANEL_MIN - 1 rows share the call or
    in_features is not a multiple of SCALE_BLOCK): one row gets the same result alone as in a prompt of PANEL_MIN
    rows or more. `threads`: how many threads the product runs on (None: torch.get_num_threads() at each call)."""

    bits = 0
    pairs = 0  # 4-bit weights: float16 numbers per block and row, 2 (d, m) or 1 (d only)
    qweight: Tensor
    scale: Tensor

    def _store(self, q: Tensor, scale: Tensor, bias: Tensor | None, threads: int | None) -> None:
        self.threads = threads
        self.register_buffer("qweight", q)
        self.register_buffer("scale", scale)
        self.bias = None if bias is None else nn.Parameter(bias.detach().float().contiguous(), requires_grad=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.multiply(x, library())

    def multiply(self, x: Tensor, lib: ctypes.CDLL) -> Tensor:
        """x @ weight.T (+ bias) by the kernels of `lib` (library(isa)'s: any instruction-set path)."""
        self.check()
        if x.device.type != "cpu":
            raise ValueError(f"camelid's int8 kernels run on the CPU and this input is on {x.device}: move it to the "
                             "CPU (on a GPU, load the model without --quantize and use --dtype bfloat16)")
        rows = x.reshape(-1, self.in_features).float().contiguous()
        y = torch.empty(rows.shape[0], self.out_features)
        status = lib.camelid_linear(self.qweight.data_ptr(), self.scale.data_ptr(), _ptr(self.bias),
                                    self.out_features, self.in_features, self.bits, self.pairs, rows.data_ptr(),
                                    rows.shape[0], y.data_ptr(), self.threads or torch.get_num_threads())
        if status != 0:
            raise MemoryError(f"camelid's int8 kernels could not allocate scratch memory for {rows.shape[0]} rows; "
                              "pass fewer rows at a time")
        return y.view(*x.shape[:-1], self.out_features).to(x.dtype)

    def dequantized(self) -> Tensor:
        raise NotImplementedError

    def check(self) -> None:
        """The kernels read raw memory: refuse what `.to()`, `.half()` and the like may have made of it."""
        tensors = [(self.qweight, self._dtypes[0]), (self.scale, self._dtypes[1])]
        tensors += [] if self.bias is None else [(self.bias, torch.float32)]
        if any(t.dtype != dtype or t.device.type != "cpu" or not t.is_contiguous() for t, dtype in tensors):
            raise ValueError("this quantized layer's weights were converted or moved; camelid's kernels need them "
                             "as quantized (on the CPU, in their own dtypes): load the model again")


class Int8Linear(QuantLinear):
    """A linear layer with int8 weights (a scale per SCALE_BLOCK weights of a row)."""

    bits = 8
    _dtypes = (torch.int8, torch.float32)

    def __init__(self, weight: "Tensor | Blocks | list", bias: Tensor | None = None, threads: int | None = None):
        """`weight` [out, in], or several [out_i, in] to stack in order (q, k, v), each rounded as it is copied;
        each a float tensor or Blocks of a type quantize_rows takes."""
        super().__init__()
        parts = weight if isinstance(weight, (list, tuple)) else [weight]
        shapes = [(w.rows, w.cols) if isinstance(w, Blocks) else tuple(w.shape) for w in parts]
        self.out_features, self.in_features = sum(rows for rows, _ in shapes), shapes[0][1]
        q = torch.empty(self.out_features, self.in_features, dtype=torch.int8)
        scale = torch.empty(self.out_features, -(-self.in_features // SCALE_BLOCK))
        start = 0
        for w, (rows, _) in zip(parts, shapes):
            quantize_rows(w, q[start : start + rows], scale[start : start + rows])
            start += rows
        self._store(q, scale, bias, threads)

    def dequantized(self) -> Tensor:
        return dequantize(self.qweight, self.scale)


class Int4Linear(QuantLinear):
    """A linear layer with 4-bit weights: per block of Q4_BLOCK weights of a row, 4-bit codes and a float16
    (scale, offset) pair, 5 bits a weight, stored interleaved in groups of Q4_ROWS rows (see deinterleave4).
    Where every part is llama.cpp's Q4_0 (offset -8 scale throughout) only the scales are kept: 4.5 bits a
    weight, as the file has them, and the same products to the bit. Inputs are rounded to int8 per block of 32
    inside the product."""

    bits = 4
    _dtypes = (torch.uint8, torch.float16)

    def __init__(self, parts: list[Tensor | Blocks], bias: Tensor | None = None, threads: int | None = None):
        """`parts` stacked in order (q, k, v): each a float weight [out_i, in] to round (quantize_rows4), or 4-bit
        blocks (e.g. a GGUF file's, taken as they are). Each part's rows must be a multiple of Q4_ROWS, and be
        a multiple of Q4_BLOCK wide."""
        super().__init__()
        blocks = [p if isinstance(p, Blocks) else quantize_rows4(p) for p in parts]
        self.out_features, self.in_features = sum(b.rows for b in blocks), blocks[0].cols
        if any(b.rows % Q4_ROWS for b in blocks):
            raise ValueError(f"4-bit weights come in groups of {Q4_ROWS} rows, not {[b.rows for b in blocks]}")
        if any(b.cols != self.in_features for b in blocks) or (bias is not None and bias.shape != (self.out_features,)):
            raise ValueError("stacked 4-bit parts must be equally wide, and a bias one value per row of them all")
        nb = self.in_features // Q4_BLOCK
        # Q4_0's offsets are all -8 d: only the scales are kept, and the kernels make the offsets
        self.pairs = 1 if all(b.type == Q4_0 for b in blocks) else 2
        q = torch.empty(self.out_features // Q4_ROWS, nb, 128, dtype=torch.uint8)
        dm = torch.empty(self.out_features // Q4_ROWS, nb, self.pairs, Q4_ROWS, dtype=torch.float16)
        group = 0
        for b in blocks:
            order = None if b.rows_from is None else b.rows_from.to(torch.int32).contiguous()
            status = library().camelid_pack4(_address(b.raw), b.type, b.rows, b.cols, _ptr(order), q[group:].data_ptr(),
                                             dm[group:].data_ptr(), self.pairs, torch.get_num_threads())
            if status != 0:
                raise ValueError(f"4-bit blocks of ggml type {b.type} cannot be taken (Q4_0, Q4_1, Q4_K only)")
            group += b.rows // Q4_ROWS
        self._store(q, dm, bias, threads)

    def dequantized(self) -> Tensor:
        return dequantize4(*deinterleave4(self.qweight, self.scale))


class _QMatrix(ctypes.Structure):
    _fields_ = [("w", ctypes.c_void_p), ("scale", ctypes.c_void_p), ("bias", ctypes.c_void_p),
                ("out", ctypes.c_int), ("in_", ctypes.c_int), ("bits", ctypes.c_int), ("pairs", ctypes.c_int)]


class _Layer(ctypes.Structure):
    _fields_ = [("attn_norm", ctypes.c_void_p), ("mlp_norm", ctypes.c_void_p), ("qkv", _QMatrix), ("o", _QMatrix),
                ("gate_up", _QMatrix), ("down", _QMatrix)]


class _Decoder(ctypes.Structure):
    _fields_ = [("n_layers", ctypes.c_int), ("dim", ctypes.c_int), ("n_heads", ctypes.c_int), ("n_kv", ctypes.c_int),
                ("head_dim", ctypes.c_int), ("inter", ctypes.c_int), ("eps", ctypes.c_float),
                ("layers", ctypes.c_void_p), ("final_norm", ctypes.c_void_p)]


def _qmatrix(layer: QuantLinear) -> _QMatrix:
    return _QMatrix(layer.qweight.data_ptr(), layer.scale.data_ptr(), _ptr(layer.bias), layer.out_features,
                    layer.in_features, layer.bits, layer.pairs)


class NativeDecoder:
    """The decoder's layers of a Llama with int8 or 4-bit weights, run by camelid_decoder_forward.

    Holds everything the kernels read, so its tensors outlive every call. It is deliberately not an nn.Module:
    `model.to()` and the like must not convert memory whose addresses the kernels hold. `hidden` stands in for
    Llama.hidden. `threads`: how many threads the kernels run on (None: torch.get_num_threads() at each call).
    """

    MAX_ROWS = 512  # tokens per call: bounds the kernels' scratch memory (a prompt longer than this goes in parts)

    def __init__(self, model, threads: int | None = None, layers: list | None = None):
        """From `model`'s float layers, or from `layers` (native_layer of each, made as the model was loaded)."""
        self.threads = threads
        config = model.config
        check_native(config)
        self.config = config
        # its own references to the int8 embeddings, so that model.to() and the like cannot move what the kernels
        # read (they replace the module's tensors, not these)
        embed = model.model.embed_tokens
        embed = embed if isinstance(embed, Int8Embedding) else Int8Embedding(embed.weight)
        self.embed_q, self.embed_scale = embed.qweight, embed.scale
        self.inv_freq = model.inv_freq.detach().float().cpu()
        self.layers = layers if layers is not None else [native_layer(block) for block in model.model.layers]
        self.final_norm = model.model.norm.weight.detach().float().contiguous()
        self._layers = (_Layer * len(self.layers))(*[
            _Layer(p.attn_norm.data_ptr(), p.mlp_norm.data_ptr(), _qmatrix(p.qkv), _qmatrix(p.o),
                   _qmatrix(p.gate_up), _qmatrix(p.down))
            for p in self.layers
        ])
        self._decoder = _Decoder(config.num_hidden_layers, config.hidden_size, config.num_attention_heads,
                                 config.num_key_value_heads, config.head_dim, config.intermediate_size,
                                 config.rms_norm_eps, ctypes.addressof(self._layers), self.final_norm.data_ptr())

    def hidden(self, tokens: Tensor, cache=None, *, valid: Tensor | None = None, positions=None, mask=None) -> Tensor:
        """As Llama.hidden, for the cases inference has: with a cache, or plain causal sequences without one."""
        from camelid.model import KVCache, rope_cos_sin

        B, T = tokens.shape
        c = self.config
        if cache is None:
            if positions is not None or mask is not None:
                raise CamelidError("a model loaded with --quantize int8 runs plain causal sequences only; "
                                   "load it without --quantize for packed or masked inputs")
            # Every layer writes its keys and values before it reads them: one layer's worth serves them all.
            cache = KVCache.__new__(KVCache)
            cache.k = [torch.empty(B, c.num_key_value_heads, T, c.head_dim)] * c.num_hidden_layers
            cache.v = [torch.empty(B, c.num_key_value_heads, T, c.head_dim)] * c.num_hidden_layers
            cache.lengths, cache.max_len = torch.zeros(B, dtype=torch.long), T
        elif positions is not None or mask is not None:
            raise ValueError("positions and mask are derived from the cache when a cache is given")
        shape = (B, c.num_key_value_heads, cache.max_len, c.head_dim)  # the kernels index it so: check it all
        if len(cache.k) != c.num_hidden_layers or any(
            buf.shape != shape or buf.dtype != torch.float32 or not buf.is_contiguous() or buf.device.type != "cpu"
            for buf in (*cache.k, *cache.v)
        ):
            raise ValueError(f"the int8 kernels need this model's float32 CPU cache for {B} rows: make it with "
                             "model.new_cache")
        counts = torch.full((B,), T) if valid is None else valid.to(torch.long).cpu()
        lengths = cache.lengths.cpu()
        kv_len = int((lengths + counts).max())
        if kv_len > cache.max_len:
            raise ValueError(f"sequence of {kv_len} tokens does not fit the cache of {cache.max_len}")
        pos = lengths[:, None] + torch.arange(T)  # [B, T]
        rows = torch.arange(B)[:, None].expand(B, T)
        keep = None if valid is None or bool((counts == T).all()) else torch.arange(T)[None, :] < counts[:, None]
        if keep is not None:  # right padding is not run at all
            pos, rows, ids = pos[keep], rows[keep], tokens[keep]
        else:
            pos, rows, ids = pos.reshape(-1), rows.reshape(-1), tokens.reshape(-1)
        n = len(ids)
        out = torch.empty(n, c.hidden_size)
        k_ptrs = (ctypes.c_void_p * len(cache.k))(*[k.data_ptr() for k in cache.k])
        v_ptrs = (ctypes.c_void_p * len(cache.v))(*[v.data_ptr() for v in cache.v])
        # In parts of MAX_ROWS tokens, in order: a row's later tokens attend to the keys its earlier parts wrote.
        for start in range(0, n, self.MAX_ROWS):
            part = slice(start, min(n, start + self.MAX_ROWS))
            m = part.stop - part.start
            x = dequantize(self.embed_q[ids[part]], self.embed_scale[ids[part]]).contiguous()
            p, r = pos[part].contiguous(), rows[part].contiguous()
            cos, sin = (t.reshape(m, -1).contiguous() for t in rope_cos_sin(self.inv_freq, p[None], torch.float32))
            status = library().camelid_decoder_forward(
                ctypes.addressof(self._decoder), m, x.data_ptr(), r.data_ptr(), p.data_ptr(), cos.data_ptr(),
                sin.data_ptr(), k_ptrs, v_ptrs, cache.max_len, out[part].data_ptr(),
                self.threads or torch.get_num_threads())
            if status == -1:
                raise MemoryError(f"camelid's int8 kernels could not allocate scratch memory for {m} tokens")
            if status != 0:
                raise RuntimeError(f"camelid's int8 kernels refused the call (status {status})")
        cache.lengths += counts.to(cache.lengths.device)
        if keep is None:
            return out.view(B, T, -1)
        hidden = torch.zeros(B, T, c.hidden_size)
        hidden[keep] = out
        return hidden


_torch_threads_lock = threading.Lock()
_torch_threads_users = 0  # threads inside torch_single_threaded
_torch_threads_saved = 0  # PyTorch's own setting, while any are


@contextlib.contextmanager
def torch_single_threaded(model):
    """Run PyTorch on one thread inside, when `model` runs on camelid's kernels (else do nothing).

    PyTorch's idle OpenMP threads spin for milliseconds after each of its parallel operations (sampling from
    49K logits is one), on the cores the kernels' threads need next: measured, that cost a batch-8 decode step
    a third of its time. Decoding loops wrap their PyTorch work in this; the kernels keep their own threads.
    The setting is process-wide, so it is counted: the last thread to leave restores PyTorch's own.
    """
    global _torch_threads_users, _torch_threads_saved
    if getattr(model, "native", None) is None and getattr(model, "quantization", None) not in ("int8", "int4"):
        yield
        return
    with _torch_threads_lock:
        if _torch_threads_users == 0:
            _torch_threads_saved = torch.get_num_threads()
            torch.set_num_threads(1)
        _torch_threads_users += 1
    try:
        yield
    finally:
        with _torch_threads_lock:
            _torch_threads_users -= 1
            if _torch_threads_users == 0:
                torch.set_num_threads(_torch_threads_saved)


def check_native(config, kind: str = "int8") -> None:
    """Refuse, in one line, a family whose layers the native decoder (int8, int4) does not run, before anything
    is loaded."""
    if config.gemma:
        raise CamelidError(f"--quantize {kind} does not run Gemma's layers (scaled embeddings, norms after attention "
                           "and MLP, GeGLU) yet; use --quantize f16")
    if config.no_rope_layers is not None and not all(config.no_rope_layers):
        raise CamelidError(f"--quantize {kind} does not run layers without the rotary embedding (SmolLM3's NoPE) "
                           "yet; use --quantize f16")
    if config.sliding_window:
        raise CamelidError(f"--quantize {kind} does not run sliding-window attention yet; use --quantize f16")
    if config.qk_norm:
        raise CamelidError(f"--quantize {kind} does not run the per-head q/k norms of {config.model_type} models "
                           "yet; use --quantize f16")
    if config.head_dim > 512:
        raise CamelidError(f"--quantize {kind} supports head dimensions up to 512, not {config.head_dim}; "
                           "use --quantize f16")


PRODUCTS = {"qkv": ("self_attn", ("q_proj", "k_proj", "v_proj")), "o": ("self_attn", ("o_proj",)),
            "gate_up": ("mlp", ("gate_proj", "up_proj")), "down": ("mlp", ("down_proj",))}


def native_layer(block, bits: dict[str, int] | None = None, blocks: dict[str, Blocks] | None = None,
                 threads: int | None = None) -> types.SimpleNamespace:
    """What the kernels read of one decoder layer: its norms, and its products (q/k/v and gate/up stacked) as
    int8, or 4-bit where `bits` says so for that product (qkv, o, gate_up, down). `blocks`: some projections'
    weights as a file stores them (by name, e.g. "q_proj": Blocks of a type the product takes), used instead of
    their float weights, which need not be loaded. `threads`: the products' own (when called as modules). The
    block's float weights can go once this is made."""
    bits, blocks = bits or {}, blocks or {}
    part = types.SimpleNamespace()
    part.attn_norm = block.input_layernorm.weight.detach().float().contiguous()
    part.mlp_norm = block.post_attention_layernorm.weight.detach().float().contiguous()
    for product, (module, names) in PRODUCTS.items():
        owner = getattr(block, module)
        layers = [getattr(owner, name) for name in names]
        biases = [lin.bias for lin in layers]
        bias = None if biases[0] is None else torch.cat(biases)
        parts = [blocks.get(name) or lin.weight for name, lin in zip(names, layers)]
        made = (Int4Linear if bits.get(product, 8) == 4 else Int8Linear)(parts, bias, threads)
        setattr(part, product, made)
    return part
