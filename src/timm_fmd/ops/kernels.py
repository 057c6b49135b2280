"""Triton kernels of the fused FMD path (see :mod:`timm_fmd.ops.fused` for the op around them).

Two kernels per forward and one per backward, each over tiles of the canonical ``(B, C, H, W)`` map
(``(B, C)`` is ``H = W = 1``, ``(B, C, L)`` is ``H = 1, W = L``) addressed through strides, so contiguous,
channels_last and any other strides need no copy:

* :func:`fmd_stats_kernel` -- per program Chan/Welford partials ``(n, mean, M2)`` of ``x`` and the count of
  distorted elements, looping over a chunk of the batch (deterministic, no atomics); a program takes every
  ``n``-th tile, so that the partials stay a few hundred however large the map; in exact mode also
  ``G = sum_b sigma_b x_b (1 - m_b)`` (Eq. 8 / 18) of its tiles, in approx mode the channel weights ``w_c``
  (Eq. 15 / 22, the authors' ``w_c`` with random signs from the kernel's stream);
* :func:`fmd_apply_kernel` -- each program first merges all the partials (``std(x)`` unbiased over every
  element, the realised fraction, ``scale = 1 / (1 - fraction)``; program 0 stores them for the caller and the
  backward), then ``out = where(m, value, x) * scale`` with ``value = -gamma std w_c z`` (approx) or
  ``-sigma_b gamma std / |w| * D[c, h, w]`` (exact);
* :func:`fmd_grad_kernel` -- ``grad_x = where(m, 0, grad * scale)``.

Each kernel takes its tensors and per-call floats first, then what a map's shape fixes (sizes, strides, the tiles'
walk) and its constexprs: :class:`timm_fmd.ops.launch.Launch` binds the latter once per shape.

The mask is never stored: every kernel regenerates it from the call's seed with counter-based Philox, as in
seeded low-memory dropout. Random streams use the Philox key ``4 * seed + k`` (``k`` = 0 block seeds / element
uniforms, 1 normals, 2 weight signs, 3 sample signs) and *logical* canonical indices as counters, so the draws do
not depend on the memory layout or the tiling: a per-element draw at ``(row, w)`` (``row`` the canonical
``(b, c, h)`` or, for a shared seed field, ``(b, h)``) takes word ``w % 4`` of Philox at counter
``row * ceil(W / 4) + w // 4`` (:func:`_draw`): one evaluation serves four elements, a quarter of the Philox work
of ``tl.rand`` per element. Block masks follow :func:`timm_fmd.ops.masks.block_mask`: seeds only at valid block
starts ``(i <= H - kh, j <= W - kw)``, each grown into ``[i, i + kh) x [j, j + kw)``, here by two running-max
scans in registers (last seed column within ``kw`` along a row, then last such row within ``kh``). A tile
larger than the map holds a whole plane; a smaller one overlaps its neighbours by a halo of ``kh - 1`` rows /
``kw - 1`` columns whose seeds it regenerates but does not own.
"""
from __future__ import annotations

import triton
import triton.language as tl

NO_SEED = tl.constexpr(-(1 << 20))  # below any index minus a block size: "no seed seen yet" in the running-max scans


@triton.jit
def _maximum(a, b):
    return tl.maximum(a, b)


@triton.jit
def _seed_rate(rate, prob_ptr, table_ptr, t_scale, RATE_FROM: tl.constexpr, TABLE_SIZE: tl.constexpr):
    """The seed (or element) rate: the float ``rate`` (0), the tensor prob (1), or prob through the table (2)."""
    if RATE_FROM == 0:
        r = rate
    elif RATE_FROM == 1:
        r = tl.load(prob_ptr).to(tl.float32)
    else:  # masks.seed_rate_table: s = -log(1 - rate) on a uniform grid of t = -log(1 - prob)
        t = -tl.log(1.0 - tl.load(prob_ptr).to(tl.float32))
        pos = tl.minimum(tl.maximum(t * t_scale, 0.0), TABLE_SIZE - 1.0)
        base = tl.minimum(tl.floor(pos), TABLE_SIZE - 2.0)
        i = base.to(tl.int32)
        s0 = tl.load(table_ptr + i)
        s1 = tl.load(table_ptr + i + 1)
        r = 1.0 - tl.exp(-(s0 + (pos - base) * (s1 - s0)))
    return r


@triton.jit
def _tile(tile, n_ht, n_wt, w_step, C, H, W, KH, BC: tl.constexpr, TH: tl.constexpr, TW: tl.constexpr):
    """Canonical indices ``c (BC,1,1)``, ``h (1,TH,1)``, ``w (1,1,TW)`` of a tile, the elements it owns and its first
    column ``ws``."""
    wt = tile % n_wt
    ht = (tile // n_wt) % n_ht
    ct = tile // (n_wt * n_ht)
    hs = ht * (TH - KH + 1)  # consecutive tiles overlap by a halo of KH - 1 rows
    ws = wt * w_step  # ... and of TW - w_step >= KW - 1 columns (w_step: a multiple of 4 where it can, fused.plan)
    c = ct * BC + tl.arange(0, BC)[:, None, None]
    h = hs + tl.arange(0, TH)[None, :, None]
    w = ws + tl.arange(0, TW)[None, None, :]
    own_h = (h >= hs + tl.where(ht > 0, KH - 1, 0)) & (h < H)
    own_w = (w >= ws + tl.where(wt > 0, TW - w_step, 0)) & (w < W)
    own = (c < C) & own_h & own_w
    return c, h, w, own, ws


@triton.jit
def _start(seed_ptr, prob_ptr, table_ptr, rate, t_scale, RATE_FROM: tl.constexpr, TABLE_SIZE: tl.constexpr):
    """What every kernel starts from: its batch split, the call's Philox key and the seed rate."""
    key = tl.load(seed_ptr).to(tl.int64) * 4
    return tl.program_id(1), key, _seed_rate(rate, prob_ptr, table_ptr, t_scale, RATE_FROM, TABLE_SIZE)


@triton.jit
def _program(seed_ptr, prob_ptr, table_ptr, rate, t_scale, n_ht, n_wt, w_step, C, H, W, KH,
             RATE_FROM: tl.constexpr, TABLE_SIZE: tl.constexpr, BC: tl.constexpr, TH: tl.constexpr,
             TW: tl.constexpr):
    """:func:`_start` and the program's own tile (one tile per program: the apply and gradient kernels)."""
    split, key, r = _start(seed_ptr, prob_ptr, table_ptr, rate, t_scale, RATE_FROM, TABLE_SIZE)
    c, h, w, own, ws = _tile(tl.program_id(0), n_ht, n_wt, w_step, C, H, W, KH, BC, TH, TW)
    return split, key, r, c, h, w, own, ws


@triton.jit
def _draw(key, row, ws, w, W, NORMAL: tl.constexpr, TWO_D: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr,
          TW: tl.constexpr, PACKED: tl.constexpr):
    """One draw per element of a ``(D0, D1, TW)`` tile (``(D1, TW)`` if ``TWO_D``) whose rows have the logical
    indices ``row`` and columns ``w = ws + [0, TW)``: a uniform, or a standard normal if ``NORMAL``.

    Element ``(row, w)`` takes word ``w % 4`` of Philox at counter ``row * ceil(W / 4) + w // 4`` (uniforms as
    ``tl.rand``; normals by Box-Muller, cos and sin of words 0-1 and of words 2-3), so one Philox evaluation serves
    four elements. ``PACKED`` (the tile's first column and width are multiples of 4): evaluated once per four
    columns and interleaved; else once per element, each keeping its word -- the same values either way."""
    wq = (W + 3) // 4
    if PACKED:
        i0, i1, i2, i3 = tl.randint4x(key, row * wq + (ws // 4 + tl.arange(0, TW // 4)))
    else:
        i0, i1, i2, i3 = tl.randint4x(key, row * wq + w // 4)
    if NORMAL:
        v0, v1 = tl.pair_uniform_to_normal(tl.uint_to_uniform_float(i0), tl.uint_to_uniform_float(i1))
        v2, v3 = tl.pair_uniform_to_normal(tl.uint_to_uniform_float(i2), tl.uint_to_uniform_float(i3))
    else:
        v0 = tl.uint_to_uniform_float(i0)
        v1 = tl.uint_to_uniform_float(i1)
        v2 = tl.uint_to_uniform_float(i2)
        v3 = tl.uint_to_uniform_float(i3)
    if PACKED:  # (..., TW / 4, 2, 2) with [q, i, j] = v[2i + j]: row-major, column 4q + r holds v_r
        both = tl.join(tl.join(v0, v2), tl.join(v1, v3))
        if TWO_D:
            out = tl.reshape(both, (D1, TW))
        else:
            out = tl.reshape(both, (D0, D1, TW))
    else:
        r = w % 4
        out = tl.where(r == 0, v0, tl.where(r == 1, v1, tl.where(r == 2, v2, v3)))
    return out


@triton.jit
def _grow(seeds, h, w, KH, KW, H_AXIS: tl.constexpr, W_AXIS: tl.constexpr):
    """Block seeds grown into ``[i, i + KH) x [j, j + KW)``: two running-max scans (see the module docstring)."""
    last_col = tl.associative_scan(tl.where(seeds, w, NO_SEED), W_AXIS, _maximum)
    rows = last_col > w - KW  # a seed within the KW columns ending here, in this row
    last_row = tl.associative_scan(tl.where(rows, h, NO_SEED), H_AXIS, _maximum)
    return last_row > h - KH


@triton.jit
def _mask(key, rate, b, c, h, w, ws, C, H, W, KH, KW, BLOCK: tl.constexpr, SHARED: tl.constexpr,
          BC: tl.constexpr, TH: tl.constexpr, TW: tl.constexpr, PACKED: tl.constexpr):
    """The distortion mask at ``(b, c, h, w)`` and the block seeds it grew from (``(1, TH, TW)`` when shared)."""
    if SHARED:  # block masks only: one seed field per sample, broadcast over the channels
        # grown as a 2-D (TH, TW) field: Triton 3.6 fails to lower a scan over a (1, TH, TW) block in a
        # channels-fastest layout (ScanOpToLLVM assertion, sm_90)
        h2 = tl.sum(h, 0)  # (TH, 1)
        w2 = tl.sum(w, 0)  # (1, TW)
        u = _draw(key, b * H + h2, ws, w2, W, False, True, 1, TH, TW, PACKED)
        seeds2 = (h2 <= H - KH) & (w2 <= W - KW) & (u < rate)
        m = _grow(seeds2, h2, w2, KH, KW, 0, 1)[None, :, :]
        seeds = seeds2[None, :, :]
    else:
        u = _draw(key, (b * C + c) * H + h, ws, w, W, False, False, BC, TH, TW, PACKED)
        if BLOCK:
            seeds = (h <= H - KH) & (w <= W - KW) & (u < rate)
            m = _grow(seeds, h, w, KH, KW, 1, 2)
        else:
            seeds = u < rate
            m = seeds
    return m, seeds


@triton.jit
def _sample_sign(key, b):
    """``sigma_b`` in {-1, +1} (``DrawnNoise.sample_signs``: ``u < 0.5`` is -1)."""
    u = tl.rand(key + 3, tl.full((1,), 0, tl.int32) + b)  # a 1-element block: b may be a plain int (interpreter)
    return tl.sum(tl.where(u < 0.5, -1.0, 1.0))


@triton.jit
def fmd_stats_kernel(x_ptr, seed_ptr, prob_ptr, table_ptr, part_ptr, g_ptr, km_ptr, sign_rep,
                     rate, w_factor, t_scale, WIN, B, C, H, W, sxb, sxc, sxh, sxw, b_chunk, n_tiles, n_ht, n_wt,
                     w_step, KH, KW, BLOCK: tl.constexpr, SHARED: tl.constexpr, EXACT: tl.constexpr,
                     HAS_KM: tl.constexpr, SIGNED: tl.constexpr, REPORT: tl.constexpr, RATE_FROM: tl.constexpr,
                     TABLE_SIZE: tl.constexpr, BC: tl.constexpr, TH: tl.constexpr, TW: tl.constexpr,
                     PACKED: tl.constexpr, CB: tl.constexpr, WINP: tl.constexpr):
    split, key, r = _start(seed_ptr, prob_ptr, table_ptr, rate, t_scale, RATE_FROM, TABLE_SIZE)
    count = 0.0
    n_acc = 0.0
    mean_acc = 0.0
    m2_acc = 0.0
    # tiles t = program, program + programs, ...: at most a few hundred partials (fused.plan), whatever the map
    for t in range(tl.program_id(0), n_tiles, tl.num_programs(0)):
        c, h, w, own, ws = _tile(t, n_ht, n_wt, w_step, C, H, W, KH, BC, TH, TW)
        offsets = c * sxc + h * sxh + w * sxw
        n_tile = tl.sum(own.to(tl.float32))
        g = tl.zeros((BC, TH, TW), dtype=tl.float32)
        for i in range(0, b_chunk):  # this program's chunk of the batch (the last one may be short)
            b = split * b_chunk + i
            if b < B:
                x = tl.load(x_ptr + b * sxb + offsets, mask=own, other=0.0).to(tl.float32)
                m, seeds = _mask(key, r, b, c, h, w, ws, C, H, W, KH, KW, BLOCK, SHARED, BC, TH, TW, PACKED)
                distorted = m & own
                count += tl.sum(distorted.to(tl.float32))
                # Chan et al.'s merge of this sample's tile statistics into the running ones
                mean_b = tl.sum(x) / n_tile
                dev = tl.where(own, x - mean_b, 0.0)
                m2_b = tl.sum(dev * dev)
                n_new = n_acc + n_tile
                delta = mean_b - mean_acc
                mean_acc += delta * (n_tile / n_new)
                m2_acc += m2_b + delta * delta * (n_acc * n_tile / n_new)
                n_acc = n_new
                if EXACT:
                    g += tl.where(distorted, 0.0, x * _sample_sign(key, b))
        if EXACT:
            tl.store(g_ptr + split * C * H * W + (c * H + h) * W + w, g, mask=own)
        elif (split == 0) & (t % (n_ht * n_wt) == 0):  # approx: w_c of this tile's channels, once per channel
            c_first = (t // (n_ht * n_wt)) * BC
            for c0 in range(c_first, c_first + BC, CB):
                cc = c0 + tl.arange(0, CB)
                tl.store(g_ptr + cc, _channel_weights(km_ptr, sign_rep, key, c0, C, WIN, w_factor, HAS_KM, SIGNED,
                                                      REPORT, CB, WINP), mask=cc < C)
    part = part_ptr + (tl.program_id(0) * tl.num_programs(1) + split) * 4
    tl.store(part, n_acc)
    tl.store(part + 1, mean_acc)
    tl.store(part + 2, m2_acc)
    tl.store(part + 3, count)


@triton.jit
def _statistics(part_ptr, n_parts, numel, gamma, PB: tl.constexpr):
    """``(std, scale, fraction, step)`` of the whole map from :func:`fmd_stats_kernel`'s partials: ``std(x)``
    unbiased over every element (Chan's merge), the realised fraction, ``scale = 1 / (1 - fraction)`` and
    ``step = gamma * std``. Every apply program reduces the partials itself, in the same order (same values):
    no one-program kernel between the two launches."""
    i = tl.arange(0, PB)
    total = 0.0
    weighted = 0.0
    count = 0.0
    for start in range(0, n_parts, PB):
        ok = start + i < n_parts
        part = part_ptr + (start + i) * 4
        n = tl.load(part, mask=ok, other=0.0)
        total += tl.sum(n)
        weighted += tl.sum(n * tl.load(part + 1, mask=ok, other=0.0))
        count += tl.sum(tl.load(part + 3, mask=ok, other=0.0))
    mean = weighted / total
    m2 = 0.0
    for start in range(0, n_parts, PB):
        ok = start + i < n_parts
        part = part_ptr + (start + i) * 4
        n = tl.load(part, mask=ok, other=0.0)
        dev = tl.load(part + 1, mask=ok, other=0.0) - mean
        m2 += tl.sum(tl.load(part + 2, mask=ok, other=0.0) + n * dev * dev)
    std = tl.sqrt(m2 / tl.where(total > 1.0, total - 1.0, total))  # unbiased, as torch.std
    fraction = count / numel
    scale = tl.where(fraction < 1.0, 1.0 / (1.0 - fraction), 1.0)
    return std, scale, fraction, gamma * std


@triton.jit
def _channel_weights(km_ptr, sign_ptr, key, c0, C, WIN, w_factor, HAS_KM: tl.constexpr, SIGNED: tl.constexpr,
                     REPORT: tl.constexpr, CB: tl.constexpr, WINP: tl.constexpr):
    """``w_c`` of the ``CB`` channels from ``c0`` (a ``(CB,)`` block), times ``w_factor``: the mean over the next
    conv's window of random signs times ``K_M`` (Eq. 22, the authors' ``w_c``; signs from stream 2), ``K_M[c]`` for
    a linear next layer, or the fixed weight without one."""
    if HAS_KM:
        c = c0 + tl.arange(0, CB)[:, None]
        k = tl.arange(0, WINP)[None, :]
        entry = c * WIN + k
        ok = (c < C) & (k < WIN)
        k_max = tl.load(km_ptr + entry, mask=ok, other=0.0).to(tl.float32)
        if SIGNED:
            positive = tl.rand(key + 2, entry) < 0.5
            w = tl.sum(tl.where(positive, k_max, -k_max), axis=1) / WIN
            if REPORT:
                tl.store(sign_ptr + entry, positive.to(tl.int8), mask=ok)
        else:  # linear next layer: w_c = K_M[c]
            w = tl.sum(k_max, axis=1)
        w = w * w_factor
    else:  # no next layer: the authors' fixed weight
        w = tl.zeros((CB,), dtype=tl.float32) + w_factor
    return w


@triton.jit
def fmd_apply_kernel(x_ptr, out_ptr, seed_ptr, prob_ptr, table_ptr, part_ptr, stats_ptr, coef_ptr,
                     mask_rep, seed_rep, normal_rep, sigma_rep,
                     rate, gamma, t_scale, numel, n_parts, WIN, B, C, H, W, sxb, sxc, sxh, sxw,
                     sob, soc, soh, sow, b_chunk, n_ht, n_wt, w_step, KH, KW, BLOCK: tl.constexpr,
                     SHARED: tl.constexpr, EXACT: tl.constexpr, RATE_FROM: tl.constexpr, TABLE_SIZE: tl.constexpr,
                     REPORT: tl.constexpr, BC: tl.constexpr, TH: tl.constexpr, TW: tl.constexpr,
                     PACKED: tl.constexpr, PB: tl.constexpr):
    split, key, r, c, h, w, own, ws = _program(seed_ptr, prob_ptr, table_ptr, rate, t_scale, n_ht, n_wt, w_step, C,
                                               H, W, KH, RATE_FROM, TABLE_SIZE, BC, TH, TW)
    x_offsets = c * sxc + h * sxh + w * sxw
    out_offsets = c * soc + h * soh + w * sow
    std, scale, fraction, step = _statistics(part_ptr, n_parts, numel, gamma, PB)
    if (tl.program_id(0) == 0) & (split == 0):  # one program publishes them (the realised fraction; the backward)
        tl.store(stats_ptr, std)
        tl.store(stats_ptr + 1, scale)
        tl.store(stats_ptr + 2, fraction)
        tl.store(stats_ptr + 3, step)
    if EXACT:  # D of the ERC gradient (Eq. 14 / 22-24)
        d = tl.load(coef_ptr + (c * H + h) * W + w, mask=own, other=0.0)
    else:  # gamma * std * w_c (Eq. 15 / 22)
        coef = tl.load(coef_ptr + c, mask=c < C, other=0.0) * step
    for i in range(0, b_chunk):  # this program's chunk of the batch (the last one may be short)
        b = split * b_chunk + i
        if b < B:
            x = tl.load(x_ptr + b * sxb + x_offsets, mask=own, other=0.0).to(tl.float32)
            m, seeds = _mask(key, r, b, c, h, w, ws, C, H, W, KH, KW, BLOCK, SHARED, BC, TH, TW, PACKED)
            if EXACT:
                sigma = _sample_sign(key, b)
                value = -((sigma * (step / WIN)) * d)
            else:
                z = _draw(key + 1, (b * C + c) * H + h, ws, w, W, True, False, BC, TH, TW, PACKED)
                value = -(coef * z)
            y = tl.where(m, value, x) * scale
            tl.store(out_ptr + b * sob + out_offsets, y.to(out_ptr.dtype.element_ty), mask=own)
            if REPORT:  # for tests: the mask, seed field, normals and signs this kernel used
                index = ((b * C + c) * H + h) * W + w  # logical canonical index
                tl.store(mask_rep + index, (m & own).to(tl.int8), mask=own)
                if BLOCK:
                    if SHARED:
                        head = own & (c == 0)  # (BC, TH, TW) like the pointers below; seeds is (1, TH, TW)
                        tl.store(seed_rep + (b * H + h) * W + w + 0 * c, (seeds & head).to(tl.int8), mask=head)
                    else:
                        tl.store(seed_rep + index, seeds.to(tl.int8), mask=own)
                if EXACT:
                    tl.store(sigma_rep + b, sigma)
                else:
                    tl.store(normal_rep + index, z, mask=own)


@triton.jit
def fmd_grad_kernel(g_ptr, dx_ptr, seed_ptr, prob_ptr, table_ptr, stats_ptr,
                    rate, t_scale, B, C, H, W, sgb, sgc, sgh, sgw, sdb, sdc, sdh, sdw, b_chunk, n_ht, n_wt, w_step,
                    KH, KW, BLOCK: tl.constexpr, SHARED: tl.constexpr, RATE_FROM: tl.constexpr,
                    TABLE_SIZE: tl.constexpr, BC: tl.constexpr, TH: tl.constexpr, TW: tl.constexpr,
                    PACKED: tl.constexpr):
    split, key, r, c, h, w, own, ws = _program(seed_ptr, prob_ptr, table_ptr, rate, t_scale, n_ht, n_wt, w_step, C,
                                               H, W, KH, RATE_FROM, TABLE_SIZE, BC, TH, TW)
    g_offsets = c * sgc + h * sgh + w * sgw
    dx_offsets = c * sdc + h * sdh + w * sdw
    scale = tl.load(stats_ptr + 1)
    for i in range(0, b_chunk):  # this program's chunk of the batch (the last one may be short)
        b = split * b_chunk + i
        if b < B:
            g = tl.load(g_ptr + b * sgb + g_offsets, mask=own, other=0.0).to(tl.float32)
            m, seeds = _mask(key, r, b, c, h, w, ws, C, H, W, KH, KW, BLOCK, SHARED, BC, TH, TW, PACKED)
            tl.store(dx_ptr + b * sdb + dx_offsets, tl.where(m, 0.0, g * scale).to(dx_ptr.dtype.element_ty), mask=own)
