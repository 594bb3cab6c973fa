"""llama.cpp's K-quant block formats, written as ggml's reference quantizers write them, in vectorised numpy.

A K-quant groups 256 weights into a super-block with one float16 scale, and sub-blocks of 16 or 32 with small
integer scales of their own. ggml's reference code (what `llama-quantize` runs without an importance matrix)
searches each sub-block's scale over a few candidates in float32 arithmetic; the same steps are taken here over
every sub-block at once, in the same order of float32 operations, so that the bytes come out as llama.cpp's.
Rounding is ggml's nearest_int (to nearest, ties to even, as numpy's rint), and float16 conversion rounds to
nearest even, as ggml's does.
"""

import numpy as np

QK_K = 256  # weights in a super-block
GROUP_MAX_EPS = np.float32(1e-15)  # ggml's threshold below which a group counts as all zeros
Q6_K_BYTES = QK_K // 2 + QK_K // 4 + QK_K // 16 + 2  # ql, qh, scales, d: 210
CHUNK = 2048  # super-blocks quantized at a time


def _f32(value) -> np.float32:
    return np.float32(value)


def _sum_in_order(by_term: np.ndarray) -> np.ndarray:
    """Sum over the first axis, term by term in float32 from the first, as ggml's loops add (numpy's own sums
    pair the terms up and round differently); each addition runs over a contiguous row."""
    total = by_term[0].copy()
    for row in by_term[1:]:
        total += row
    return total


def _running_sum(terms: np.ndarray) -> np.ndarray:
    """_sum_in_order over the last axis."""
    return _sum_in_order(np.ascontiguousarray(np.moveaxis(terms, -1, 0)))


def _chunked(quantize):
    """`quantize` applied to at most CHUNK super-blocks at a time: its temporaries stay in cache, and memory stays
    flat however large the tensor."""

    def run(weights: np.ndarray) -> np.ndarray:
        rows = np.ascontiguousarray(weights, dtype=np.float32).reshape(-1, QK_K)
        out = np.concatenate([quantize(rows[i : i + CHUNK]) for i in range(0, len(rows), CHUNK)])
        return out.reshape(*weights.shape[:-1], -1)

    run.__doc__, run.__name__ = quantize.__doc__, quantize.__name__
    return run


def _nearest(values: np.ndarray) -> np.ndarray:
    """ggml's nearest_int of float32 values: to the nearest integer, ties to even."""
    return np.rint(values).astype(np.int32)


def _weighted_sums(x: np.ndarray, w: np.ndarray, levels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """sum(w * x * l) and sum(w * l * l) over the last axis, accumulated as ggml's loops do (_running_sum)."""
    lf = levels.astype(np.float32)
    return _running_sum((w * x) * lf), _running_sum((w * lf) * lf)


def _qx_scales(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """ggml's make_qx_quants with rmse_type 1 (weights x squared) over groups [n, size]: (scale [n], levels
    [n, size] in 0..2*nmax-1). The scale minimising the weighted error among iscale = -(nmax + is/10) / max."""
    amax_at = np.abs(x).argmax(-1)
    peak = np.take_along_axis(x, amax_at[:, None], -1)[:, 0]  # the value of largest magnitude, the first such
    zero = np.abs(peak) < GROUP_MAX_EPS
    peak = np.where(zero, _f32(1), peak)
    w = x * x

    def levels_for(iscale):
        return np.clip(_nearest(iscale[:, None] * x), -nmax, nmax - 1)

    iscale = -_f32(nmax) / peak
    levels = levels_for(iscale)
    sum_lx, sum_l2 = _weighted_sums(x, w, levels)
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = np.where(sum_l2 != 0, sum_lx / sum_l2, _f32(0)).astype(np.float32)
    best = scale * sum_lx
    for step in range(-9, 10):
        if step == 0:
            continue
        iscale = -(_f32(nmax) + _f32(0.1) * _f32(step)) / peak
        trial = levels_for(iscale)
        lx, l2 = _weighted_sums(x, w, trial)
        better = (l2 > 0) & (lx * lx > best * l2)
        levels = np.where(better[:, None], trial, levels)
        with np.errstate(divide="ignore", invalid="ignore"):
            scale = np.where(better, lx / l2, scale).astype(np.float32)
        best = np.where(better, scale * lx, best).astype(np.float32)
    scale = np.where(zero, _f32(0), scale)
    levels = np.where(zero[:, None], -nmax, levels)  # ggml leaves an all-zero group's levels at 0, not nmax
    return scale, levels + nmax


def use_more_bits(index: int, layers: int) -> bool:
    """Whether llama-quantize's Q4_K_M and Q5_K_M give layer `index` of `layers` more bits (attn_v, ffn_down):
    the first and last eighth, and every third layer between."""
    return index < layers // 8 or index >= 7 * layers // 8 or (index - layers // 8) % 3 == 2


@_chunked
def quantize_q6_k(weights: np.ndarray) -> np.ndarray:
    """float32 rows (a multiple of 256 wide) as Q6_K blocks, the bytes of ggml's quantize_row_q6_K_ref."""
    x = np.ascontiguousarray(weights, dtype=np.float32).reshape(-1, QK_K // 16, 16)  # [blocks, 16 groups, 16]
    blocks = x.shape[0]
    scales, levels = _qx_scales(x.reshape(-1, 16), 32)
    scales, levels = scales.reshape(blocks, 16), levels.reshape(blocks, 16, 16)
    top_at = np.abs(scales).argmax(-1)
    top = np.take_along_axis(scales, top_at[:, None], -1)[:, 0]  # the scale of largest magnitude, the first such
    empty = np.abs(top) < GROUP_MAX_EPS
    iscale = _f32(-128) / np.where(empty, _f32(1), top)
    d = (_f32(1) / iscale).astype(np.float16)
    small = np.minimum(127, _nearest(iscale[:, None] * scales)).astype(np.int8)
    step = d.astype(np.float32)[:, None] * small.astype(np.float32)  # each group's scale as dequantizing sees it
    with np.errstate(divide="ignore", invalid="ignore"):
        again = np.clip(_nearest(np.where(step[..., None] != 0, x / step[..., None], 0)), -32, 31) + 32
    levels = np.where(step[..., None] != 0, again, levels).reshape(blocks, QK_K).astype(np.uint8)

    # ggml's layout: per 128 weights, 64 bytes of low nibbles (weights l and l+64 share a byte, l+32 and l+96 the
    # next 32) and 32 bytes of high bit pairs (l, l+32, l+64, l+96 in one byte)
    halves = levels.reshape(blocks, 2, 4, 32)  # [block, half, quarter, l]
    low = halves & 0x0F
    ql = np.concatenate([low[:, :, 0] | (low[:, :, 2] << 4), low[:, :, 1] | (low[:, :, 3] << 4)], axis=-1)
    high = halves >> 4
    qh = high[:, :, 0] | (high[:, :, 1] << 2) | (high[:, :, 2] << 4) | (high[:, :, 3] << 6)
    out = np.zeros((blocks, Q6_K_BYTES), np.uint8)
    out[:, :128] = ql.reshape(blocks, 128)
    out[:, 128:192] = qh.reshape(blocks, 64)
    out[:, 192:208] = np.where(empty[:, None], 0, small).view(np.uint8)
    out[:, 208:210] = np.where(empty, np.float16(0), d).view(np.uint8).reshape(blocks, 2)
    out[empty] = 0
    return out.reshape(*weights.shape[:-1], -1)




def _qkx2_scales(x: np.ndarray, weights: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int,
                 mad: bool = False):
    """ggml's make_qkx2_quants over groups [n, size]: a scale and a minimum for each group (levels 0..nmax from
    the minimum up), the pair of least weighted squared error (absolute error, given `mad`) among the plain one and
    `nstep` + 1 candidates fitted by least squares. (scale [n], -minimum [n], levels [n, size]).

    The work is laid out element by element ([size, n]), so that the sums ggml takes in order add contiguous rows."""
    x, weights = np.ascontiguousarray(x.T), np.ascontiguousarray(weights.T)
    total = _sum_in_order

    low = np.minimum(x.min(0), _f32(0))
    high = x.max(0)
    flat = high == low
    sum_w, sum_x = total(weights), total(weights * x)

    def levels_for(iscale, minimum):
        return np.clip(_nearest(iscale * (x - minimum)), 0, nmax)

    def error(scale, minimum, levels):
        diff = (scale * levels.astype(np.float32) + minimum) - x
        return total(weights * (np.abs(diff) if mad else diff * diff))

    iscale = _f32(nmax) / np.where(flat, _f32(1), high - low)
    scale = _f32(1) / iscale
    minimum = low.copy()
    levels = levels_for(iscale, minimum)
    best = error(scale, minimum, levels)
    for step in range(nstep + 1):
        # ggml moves the minimum to each better fit it finds, and the next candidates are taken from there
        iscale = ((_f32(rmin) + _f32(rdelta) * _f32(step)) + _f32(nmax)) / np.where(flat, _f32(1), high - minimum)
        trial = levels_for(iscale, minimum)
        lf = trial.astype(np.float32)
        wl = weights * lf
        sum_l, sum_l2, sum_xl = total(wl), total(wl * lf), total(wl * x)
        det = sum_w * sum_l2 - sum_l * sum_l
        fits = det > 0
        safe = np.where(fits, det, _f32(1))
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / safe
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / safe
        positive = this_min > 0
        with np.errstate(divide="ignore", invalid="ignore"):
            this_scale = np.where(positive, sum_xl / sum_l2, this_scale).astype(np.float32)
        this_min = np.where(positive, _f32(0), this_min).astype(np.float32)
        current = error(this_scale, this_min, trial)
        better = fits & (current < best)
        best = np.where(better, current, best)
        levels = np.where(better, trial, levels)
        scale = np.where(better, this_scale, scale)
        minimum = np.where(better, this_min, minimum)
    scale = np.where(flat, _f32(0), scale).astype(np.float32)
    levels = np.where(flat, 0, levels)
    return scale, (-minimum).astype(np.float32), np.ascontiguousarray(levels.T)


def _largest_and_factor(values: np.ndarray, levels: int) -> tuple[np.ndarray, np.ndarray]:
    """Each super-block's largest sub-block scale (or minimum; at least 0) [blocks], and the factor that maps it
    to `levels` (0 where it is 0), as ggml's K-quants compute them before rounding the sub-blocks' to integers."""
    top = np.maximum(values.max(-1), _f32(0))
    with np.errstate(divide="ignore"):
        return top, np.where(top > 0, _f32(levels) / top, _f32(0)).astype(np.float32)


def _k_blocks(weights: np.ndarray, nmax: int, rmin: float, nstep: int):
    """The super-blocks of Q4_K (nmax 15) or Q5_K (31): (d, dmin as float16 [blocks], packed scales [blocks, 12],
    levels [blocks, 256]), as ggml's quantize_row_q4_K_ref / q5_K_ref compute them."""
    x = np.ascontiguousarray(weights, dtype=np.float32).reshape(-1, 8, 32)  # [blocks, 8 groups, 32]
    blocks = x.shape[0]
    groups = x.reshape(-1, 32)
    av_x = np.sqrt(_running_sum(groups * groups) / _f32(32))
    scales, mins, levels = _qkx2_scales(groups, av_x[:, None] + np.abs(groups), nmax, rmin, 0.1, nstep)
    scales, mins, levels = scales.reshape(blocks, 8), mins.reshape(blocks, 8), levels.reshape(blocks, 8, 32)
    top_scale, inv_scale = _largest_and_factor(scales, 63)
    top_min, inv_min = _largest_and_factor(mins, 63)
    ls = np.minimum(63, _nearest(inv_scale[:, None] * scales).astype(np.uint8))
    lm = np.minimum(63, _nearest(inv_min[:, None] * mins).astype(np.uint8))
    packed = np.zeros((blocks, 12), np.uint8)
    packed[:, 0:4] = ls[:, :4] | ((ls[:, 4:] >> 4) << 6)
    packed[:, 4:8] = lm[:, :4] | ((lm[:, 4:] >> 4) << 6)
    packed[:, 8:12] = (ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4)
    d = (top_scale / _f32(63)).astype(np.float16)
    dmin = (top_min / _f32(63)).astype(np.float16)
    step = d.astype(np.float32)[:, None] * ls.astype(np.float32)
    offset = dmin.astype(np.float32)[:, None] * lm.astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        again = _nearest(np.where(step[..., None] != 0, (x + offset[..., None]) / step[..., None], 0))
    levels = np.where(step[..., None] != 0, np.clip(again, 0, nmax), levels).reshape(blocks, QK_K).astype(np.uint8)
    return d, dmin, packed, levels


@_chunked
def quantize_q4_k(weights: np.ndarray) -> np.ndarray:
    """float32 rows (a multiple of 256 wide) as Q4_K blocks, the bytes of ggml's quantize_row_q4_K_ref."""
    d, dmin, packed, levels = _k_blocks(weights, 15, -1.0, 20)
    quarters = levels.reshape(-1, 4, 2, 32)  # per 64 weights: the first 32 in low nibbles, the next 32 in high
    qs = (quarters[:, :, 0] | (quarters[:, :, 1] << 4)).reshape(-1, 128)
    out = np.concatenate([d.view(np.uint8).reshape(-1, 2), dmin.view(np.uint8).reshape(-1, 2), packed, qs], axis=1)
    return out.reshape(*weights.shape[:-1], -1)


@_chunked
def quantize_q5_k(weights: np.ndarray) -> np.ndarray:
    """float32 rows (a multiple of 256 wide) as Q5_K blocks, the bytes of ggml's quantize_row_q5_K_ref."""
    d, dmin, packed, levels = _k_blocks(weights, 31, -0.5, 15)
    quarters = levels.reshape(-1, 4, 2, 32)
    low = quarters & 0x0F
    qs = (low[:, :, 0] | (low[:, :, 1] << 4)).reshape(-1, 128)
    high = quarters >> 4  # bit 4 of each level: quarter q, half h goes to bit 2q + h of qh
    qh = np.zeros((levels.shape[0], 32), np.uint8)
    for q in range(4):
        qh |= (high[:, q, 0] << (2 * q)) | (high[:, q, 1] << (2 * q + 1))
    out = np.concatenate([d.view(np.uint8).reshape(-1, 2), dmin.view(np.uint8).reshape(-1, 2), packed, qh, qs],
                         axis=1)
    return out.reshape(*weights.shape[:-1], -1)


def _two_bit_planes(levels: np.ndarray) -> np.ndarray:
    """Levels 0..3 [blocks, 256] packed as ggml's Q2_K and Q3_K pack them: per 128 weights, 32 bytes whose bit pairs
    hold weights l, l+32, l+64, l+96 from the lowest pair up. [blocks, 64]."""
    quarters = levels.reshape(-1, 2, 4, 32)
    return (quarters[:, :, 0] | (quarters[:, :, 1] << 2) | (quarters[:, :, 2] << 4)
            | (quarters[:, :, 3] << 6)).reshape(-1, QK_K // 4)


@_chunked
def quantize_q2_k(weights: np.ndarray) -> np.ndarray:
    """float32 rows (a multiple of 256 wide) as Q2_K blocks, the bytes of ggml's quantize_row_q2_K_ref: 16 groups
    of 16, each with a 4-bit scale and a 4-bit minimum (fitted weighing each weight by its magnitude, on absolute
    error)."""
    x = np.ascontiguousarray(weights, dtype=np.float32).reshape(-1, QK_K // 16, 16)
    blocks = x.shape[0]
    groups = x.reshape(-1, 16)
    scales, mins, levels = _qkx2_scales(groups, np.abs(groups), 3, -0.5, 0.1, 15, mad=True)
    scales, mins, levels = scales.reshape(blocks, 16), mins.reshape(blocks, 16), levels.reshape(blocks, 16, 16)
    top_scale, inv_scale = _largest_and_factor(scales, 15)
    top_min, inv_min = _largest_and_factor(mins, 15)
    # ggml stores these unclamped, each into a byte as C converts (a scale's in the low nibble, a minimum's high)
    low = np.where((top_scale > 0)[:, None], _nearest(inv_scale[:, None] * scales) & 0xFF, 0)
    high = (_nearest(inv_min[:, None] * mins) << 4) & 0xFF
    packed = np.where((top_min > 0)[:, None], low | high, low).astype(np.uint8)
    d = np.where(top_scale > 0, top_scale / _f32(15), _f32(0)).astype(np.float16)
    dmin = np.where(top_min > 0, top_min / _f32(15), _f32(0)).astype(np.float16)
    step = d.astype(np.float32)[:, None] * (packed & 0x0F).astype(np.float32)
    offset = dmin.astype(np.float32)[:, None] * (packed >> 4).astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        again = _nearest(np.where(step[..., None] != 0, (x + offset[..., None]) / step[..., None], 0))
    levels = np.where(step[..., None] != 0, np.clip(again, 0, 3), levels).reshape(blocks, QK_K).astype(np.uint8)
    out = np.concatenate([packed, _two_bit_planes(levels), d.view(np.uint8).reshape(-1, 2),
                          dmin.view(np.uint8).reshape(-1, 2)], axis=1)
    return out.reshape(*weights.shape[:-1], -1)


def _q3_scales(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ggml's make_q3_quants(nmax 4, do_rmse) over groups [n, 16]: the scale from the largest magnitude, then up
    to five passes that move one level at a time while the weighted fit improves, element by element in order as
    ggml's loop does (each move changes the sums the next one sees). (scale [n], levels [n, 16] in 0..7; an
    all-zero group's levels are 0, as ggml leaves them.)"""
    nmax = 4
    amax_at = np.abs(x).argmax(-1)
    peak = np.take_along_axis(x, amax_at[:, None], -1)[:, 0]
    zero = np.abs(peak) < GROUP_MAX_EPS
    iscale = _f32(-nmax) / np.where(zero, _f32(1), peak)
    levels = np.clip(_nearest(iscale[:, None] * x), -nmax, nmax - 1)
    w = x * x
    wx = w * x
    sum_lx, sum_l2 = _weighted_sums(x, w, levels)
    for _ in range(5):  # a pass that changes nothing leaves the next unchanged, so all five run for every group
        for i in range(x.shape[1]):
            li = levels[:, i].astype(np.float32)
            slx = sum_lx - wx[:, i] * li
            sl2 = sum_l2 - (w[:, i] * li) * li
            with np.errstate(divide="ignore", invalid="ignore"):
                trial = _nearest(np.where(slx > 0, (x[:, i] * sl2) / slx, 0))
            trial = np.clip(trial, -nmax, nmax - 1)
            tf = trial.astype(np.float32)
            new_lx = slx + wx[:, i] * tf
            new_l2 = sl2 + (w[:, i] * tf) * tf
            take = ((slx > 0) & (trial != levels[:, i]) & (new_l2 > 0)
                    & ((new_lx * new_lx) * sum_l2 > (sum_lx * sum_lx) * new_l2))
            levels[:, i] = np.where(take, trial, levels[:, i])
            sum_lx = np.where(take, new_lx, sum_lx)
            sum_l2 = np.where(take, new_l2, sum_l2)
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = np.where(sum_l2 > 0, sum_lx / sum_l2, _f32(0)).astype(np.float32)
    scale = np.where(zero, _f32(0), scale)
    levels = np.where(zero[:, None], 0, levels + nmax)
    return scale, levels


@_chunked
def quantize_q3_k(weights: np.ndarray) -> np.ndarray:
    """float32 rows (a multiple of 256 wide) as Q3_K blocks, the bytes of ggml's quantize_row_q3_K_ref: 16 groups
    of 16 with 6-bit scales, 3-bit levels whose high bits go in a separate mask."""
    x = np.ascontiguousarray(weights, dtype=np.float32).reshape(-1, QK_K // 16, 16)
    blocks = x.shape[0]
    scales, levels = _q3_scales(x.reshape(-1, 16))
    scales, levels = scales.reshape(blocks, 16), levels.reshape(blocks, 16, 16)
    top_at = np.abs(scales).argmax(-1)
    top = np.take_along_axis(scales, top_at[:, None], -1)[:, 0]  # the scale of largest magnitude, the first such
    some = top != 0
    iscale = np.where(some, _f32(-32) / np.where(some, top, _f32(1)), _f32(0)).astype(np.float32)
    small = np.clip(_nearest(iscale[:, None] * scales), -32, 31) + 32  # 0..63
    small = np.where(some[:, None], small, 0)
    packed = np.zeros((blocks, 12), np.uint8)
    packed[:, :8] = (small[:, :8] & 0xF) | ((small[:, 8:] & 0xF) << 4)
    high = small >> 4  # two bits of group j go to byte 8 + j % 4, at bit 2 * (j // 4)
    for j in range(16):
        packed[:, 8 + j % 4] |= (high[:, j] << (2 * (j // 4))).astype(np.uint8)
    with np.errstate(divide="ignore"):
        d = np.where(some, _f32(1) / np.where(some, iscale, _f32(1)), _f32(0)).astype(np.float16)
    # a group's scale as dequantizing sees it (without a scale, the zero bytes read back as -32, times d = 0)
    step = d.astype(np.float32)[:, None] * (small - 32).astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        again = _nearest(np.where(step[..., None] != 0, x / step[..., None], 0))
    levels = np.where(step[..., None] != 0, np.clip(again, -4, 3) + 4, levels).reshape(blocks, QK_K)
    # the high bit of weight j goes to bit j // 32 of mask byte j % 32; the low two bits as Q2_K packs them
    hmask = np.zeros((blocks, QK_K // 8), np.uint8)
    upper = (levels > 3).reshape(blocks, 8, 32)
    for bit in range(8):
        hmask |= (upper[:, bit] << bit).astype(np.uint8)
    levels = np.where(levels > 3, levels - 4, levels).astype(np.uint8)
    out = np.concatenate([hmask, _two_bit_planes(levels), packed, d.view(np.uint8).reshape(-1, 2)], axis=1)
    return out.reshape(*weights.shape[:-1], -1)
