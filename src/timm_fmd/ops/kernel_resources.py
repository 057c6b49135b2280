"""Compile the fused path's kernels for a GPU target without a GPU and read their registers and spills.

    python -m timm_fmd.ops.kernel_resources            # sm_90 (H100/H200): one row per kernel and shape

Each kernel is compiled by Triton for ``GPUTarget('cuda', capability, 32)`` with the tiles that
:func:`timm_fmd.ops.fused.plan` picks on a GPU and the JIT's specialisation of the launch's integers, for the
benchmark shapes, contiguous and channels_last, per-channel and shared masks; ``ptxas -v`` (shipped with Triton)
reports registers and spill stores/loads of the PTX, and :func:`resident_warps` turns registers and shared memory
into the warps an SM keeps resident (theoretical occupancy). A kernel that only the interpreter accepts fails here.
Run without ``TRITON_INTERPRET`` (the interpreter replaces the kernels by Python functions).
"""
from __future__ import annotations

import itertools
import os
import re
import subprocess
import tempfile
from typing import Dict, List, Optional, Sequence, Tuple

from . import kernels
from .fused import CHANNEL_BLOCK, PARTS_BLOCK, num_warps, plan
from .masks import RATE_TABLE_SIZE

# the last: ViT tokens (B, N, C) in canonical (B, C, 1, N)
SHAPES = [(32, 1024, 14, 14), (32, 2048, 7, 7), (64, 64, 32, 32), (64, 256, 56, 56), (64, 768, 1, 197)]


# sm_90 (CUDA C++ Programming Guide, technical specifications per compute capability; CUDA occupancy calculator)
SM90_REGISTERS = 65536  # 32-bit registers per SM
SM90_REGISTER_UNIT = 8  # registers per thread are allocated in multiples of 8 (256 per warp)
SM90_WARPS = 64  # resident warps per SM
SM90_PROGRAMS = 32  # resident thread blocks per SM
SM90_SHARED = 228 * 1024  # shared memory per SM, bytes
SM90_SHARED_RESERVED = 1024  # bytes the system reserves per thread block


def resident_warps(registers: int, shared: int, warps: int) -> int:
    """Warps of a kernel that one sm_90 SM keeps resident: whole programs of ``warps`` warps that fit its
    registers (``registers`` a thread), its shared memory (``shared`` bytes a program), and its warp and program
    limits. Out of 64: 16 is 25% theoretical occupancy."""
    per_thread = -(-registers // SM90_REGISTER_UNIT) * SM90_REGISTER_UNIT
    programs = min(SM90_PROGRAMS, SM90_WARPS // warps, SM90_REGISTERS // (per_thread * 32 * warps),
                   SM90_SHARED // (shared + SM90_SHARED_RESERVED))
    return programs * warps


def _signature(fn, types: Dict[str, str], constexprs: Dict[str, object]) -> Dict[str, str]:
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = 'constexpr'
        elif name.endswith('_ptr') or name.endswith('_rep'):
            sig[name] = types.get(name, '*fp32')
        elif name in ('rate', 't_scale', 'gamma', 'w_factor', 'numel'):
            sig[name] = 'fp32'
        else:
            sig[name] = 'i32'
    return sig


def _ptxas_usage(ptx: str, arch: str) -> Dict[str, int]:
    import triton
    ptxas = os.path.join(os.path.dirname(triton.__file__), 'backends', 'nvidia', 'bin', 'ptxas')
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, 'k.ptx')
        with open(src, 'w') as f:
            f.write(ptx)
        text = subprocess.run([ptxas, '-v', f'--gpu-name={arch}', src, '-o', os.path.join(tmp, 'k.cubin')],
                              capture_output=True, text=True, check=True).stderr
    regs = re.search(r'Used (\d+) registers', text)
    stores = re.search(r'(\d+) bytes spill stores', text)
    loads = re.search(r'(\d+) bytes spill loads', text)
    return dict(registers=int(regs.group(1)), spill_stores=int(stores.group(1)) if stores else 0,
                spill_loads=int(loads.group(1)) if loads else 0)


def _specialise(fn, values: Dict[str, int], constexprs: Dict[str, object]) -> Tuple[Dict[str, object], dict]:
    """Triton's JIT specialisation of a launch: integer arguments equal to 1 become constants, pointers and
    integers divisible by 16 get ``tt.divisibility`` -- the layouts, and the code generator's failures, depend
    on it (Triton 3.6 failed to lower a channels_last scan only with the strides' divisibility known)."""
    constexprs = dict(constexprs, **{n: 1 for n, v in values.items() if v == 1 and n in fn.arg_names})
    attrs = {(i,): [['tt.divisibility', 16]] for i, n in enumerate(fn.arg_names) if n not in constexprs and (
        n.endswith('_ptr') or n.endswith('_rep') or (n in values and values[n] % 16 == 0))}
    return constexprs, attrs


def compile_kernel(fn, types: Dict[str, str], constexprs: Dict[str, object], capability: int = 90,
                   warps: int = 4, values: Optional[Dict[str, int]] = None) -> Dict[str, int]:
    """Compile ``fn`` for ``sm_<capability>`` as a launch with the integer arguments ``values`` would be
    specialised, and return its registers and spill bytes (``ptxas -v``), its shared memory in bytes (Triton's), its
    resident warps per SM (:func:`resident_warps`, sm_90's limits) and its multiply-high instructions (``mul.hi``
    in the PTX: two per Philox round, most of Philox's work)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    if not isinstance(fn, triton.runtime.JITFunction):
        raise RuntimeError('the kernels are interpreted (TRITON_INTERPRET is set): compile them in a fresh process')
    constexprs, attrs = _specialise(fn, values or {}, constexprs)
    src = ASTSource(fn, _signature(fn, types, constexprs), constexprs, attrs)
    compiled = triton.compile(src, target=GPUTarget('cuda', capability, 32), options={'num_warps': warps})
    ptx = compiled.asm['ptx']
    arch = re.search(r'\.target\s+(sm_\w+)', ptx).group(1)
    usage = _ptxas_usage(ptx, arch)
    shared = int(compiled.metadata.shared)
    return dict(usage, shared=shared, resident_warps=resident_warps(usage['registers'], shared, warps),
                mul_hi=len(re.findall(r'\bmul\.hi\.', ptx)))


def _launch_values(shape: Tuple[int, int, int, int], channels_last: bool, tiles, kh: int, kw: int) -> Dict[str, int]:
    """The integer arguments of a launch on a contiguous or channels_last ``(B, C, H, W)`` map (input and output
    strides alike), as :mod:`timm_fmd.ops.fused` passes them."""
    batch, channels, height, width = shape
    if channels_last:
        strides = (height * width * channels, 1, width * channels, channels)
    else:
        strides = (channels * height * width, height * width, width, 1)
    values = dict(B=batch, C=channels, H=height, W=width, b_chunk=tiles.b_chunk, n_tiles=tiles.n_tiles,
                  n_ht=tiles.n_ht, n_wt=tiles.n_wt, w_step=tiles.w_step, KH=kh, KW=kw)
    for prefix in ('sx', 'so', 'sg', 'sd'):
        values.update(zip((prefix + a for a in 'bchw'), strides))
    return values


def kernel_resources(capability: int = 90, shapes=SHAPES, block_size: int = 7,
                     layouts: Sequence[bool] = (True,), shared: Sequence[bool] = (False,),
                     reports: bool = False) -> List[dict]:
    """Registers and spills of every kernel of the fused path for ``shapes`` (bf16, 132 SMs), channels_last
    and/or contiguous (``layouts``), per-channel and/or shared block masks (``shared``); with ``reports`` also the
    variants that report their draws to the tests."""
    rows = []
    for shape, channels_last, shared_mask in itertools.product(shapes, layouts, shared):
        height, width = shape[2], shape[3]
        block = height > 1
        if shared_mask and not block:
            continue  # tokens: element masks, never shared
        kh, kw = (min(block_size, height), min(block_size, width)) if block else (1, 1)
        tiles = plan(shape, 1 if channels_last else height * width, kh, kw, gpu=True, programs=4 * 132)
        values = _launch_values(shape, channels_last, tiles, kh, kw)
        mask = dict(BLOCK=block, SHARED=shared_mask, RATE_FROM=2, TABLE_SIZE=RATE_TABLE_SIZE, BC=tiles.bc,
                    TH=tiles.th, TW=tiles.tw, PACKED=tiles.packed)
        io = {'x_ptr': '*bf16', 'out_ptr': '*bf16', 'g_ptr': '*bf16', 'dx_ptr': '*bf16', 'seed_ptr': '*i64',
              'mask_rep': '*i8', 'seed_rep': '*i8', 'sign_rep': '*i8', 'km_ptr': '*bf16'}
        # a 3x3 next conv seen by an approx site (signed K_M), the common case
        stats = dict(HAS_KM=True, SIGNED=True, CB=min(tiles.bc, CHANNEL_BLOCK), WINP=16, **mask)
        stats_io = {**io, 'g_ptr': '*fp32'}
        variants = [
            ('stats approx', kernels.fmd_stats_kernel, dict(EXACT=False, REPORT=False, **stats), stats_io),
            ('stats exact', kernels.fmd_stats_kernel, dict(EXACT=True, REPORT=False, **stats), stats_io),
            ('apply approx', kernels.fmd_apply_kernel, dict(EXACT=False, REPORT=False, PB=PARTS_BLOCK, **mask), io),
            ('apply exact', kernels.fmd_apply_kernel, dict(EXACT=True, REPORT=False, PB=PARTS_BLOCK, **mask), io),
            ('grad', kernels.fmd_grad_kernel, dict(mask), io),
        ]
        if reports:  # the tests' report variants: they must compile (a GPU run of the CUDA tests launches them)
            variants += [
                ('stats report', kernels.fmd_stats_kernel, dict(EXACT=False, REPORT=True, **stats), stats_io),
                ('apply approx report', kernels.fmd_apply_kernel, dict(EXACT=False, REPORT=True, PB=PARTS_BLOCK,
                                                                        **mask), io),
                ('apply exact report', kernels.fmd_apply_kernel, dict(EXACT=True, REPORT=True, PB=PARTS_BLOCK,
                                                                       **mask), io),
            ]
        for name, fn, constexprs, types in variants:
            warps = num_warps(tiles)
            usage = compile_kernel(fn, types, constexprs, capability, warps, values=values)
            rows.append(dict(kernel=name, shape=shape, layout='channels_last' if channels_last else 'contiguous',
                             mask='shared' if shared_mask else 'per-channel', tile=(tiles.bc, tiles.th, tiles.tw),
                             warps=warps, **usage))
    return rows


def main() -> None:
    import triton
    print(f'triton {triton.__version__}, sm_90, bf16, block 7, tiles from fused.plan')
    print(f"{'kernel':<14} | {'shape':<20} | {'layout':<13} | {'mask':<11} | {'tile (C,H,W)':<14} | warps | regs | "
          f"spill st | spill ld | shared B | warps/SM | mul.hi")
    for r in kernel_resources(layouts=(True, False), shared=(False, True)):
        print(f"{r['kernel']:<14} | {str(r['shape']):<20} | {r['layout']:<13} | {r['mask']:<11} | "
              f"{str(r['tile']):<14} | {r['warps']:5d} | {r['registers']:4d} | {r['spill_stores']:8d} | "
              f"{r['spill_loads']:8d} | {r['shared']:8d} | {r['resident_warps']:8d} | {r['mul_hi']:6d}")


if __name__ == '__main__':
    main()
