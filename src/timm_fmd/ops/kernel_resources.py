"""Compile the fused path's kernels for a GPU target without a GPU and read their registers and spills.

    python -m timm_fmd.ops.kernel_resources            # sm_90 (H100/H200): one row per kernel and shape

Each kernel is compiled by Triton for ``GPUTarget('cuda', capability, 32)`` with the tiles that
:func:`timm_fmd.ops.fused.plan` picks on a GPU, for the benchmark shapes; ``ptxas -v`` (shipped with Triton)
reports registers and spill stores/loads of the PTX. A kernel that only the interpreter accepts fails here.
Run without ``TRITON_INTERPRET`` (the interpreter replaces the kernels by Python functions).
"""
from __future__ import annotations

import os
import re
import subprocess
import tempfile
from typing import Dict, List

from . import kernels
from .fused import num_warps, plan
from .masks import RATE_TABLE_SIZE

# the last: ViT tokens (B, N, C) in canonical (B, C, 1, N)
SHAPES = [(32, 1024, 14, 14), (32, 2048, 7, 7), (64, 64, 32, 32), (64, 256, 56, 56), (64, 768, 1, 197)]


def _signature(fn, types: Dict[str, str], constexprs: Dict[str, object]) -> Dict[str, str]:
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = 'constexpr'
        elif name.endswith('_ptr') or name.endswith('_rep'):
            sig[name] = types.get(name, '*fp32')
        elif name in ('rate', 't_scale', 'gamma', 'w_factor', 'numel', 'window'):
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


def compile_kernel(fn, types: Dict[str, str], constexprs: Dict[str, object], capability: int = 90,
                   warps: int = 4) -> Dict[str, int]:
    """Compile ``fn`` for ``sm_<capability>`` and return its registers and spill bytes (``ptxas -v``)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    if not isinstance(fn, triton.runtime.JITFunction):
        raise RuntimeError('the kernels are interpreted (TRITON_INTERPRET is set): compile them in a fresh process')
    src = ASTSource(fn, _signature(fn, types, constexprs), constexprs)
    compiled = triton.compile(src, target=GPUTarget('cuda', capability, 32), options={'num_warps': warps})
    arch = re.search(r'\.target\s+(sm_\w+)', compiled.asm['ptx']).group(1)
    return _ptxas_usage(compiled.asm['ptx'], arch)


def kernel_resources(capability: int = 90, shapes=SHAPES, block_size: int = 7) -> List[dict]:
    """Registers and spills of every kernel of the fused path for ``shapes`` (bf16, channels_last, 132 SMs)."""
    rows = []
    for shape in shapes:
        height, width = shape[2], shape[3]
        block = height > 1
        kh, kw = (min(block_size, height), min(block_size, width)) if block else (1, 1)
        tiles = plan(shape, 1, kh, kw, gpu=True, programs=4 * 132)
        mask = dict(BLOCK=block, SHARED=False, RATE_FROM=2, TABLE_SIZE=RATE_TABLE_SIZE, BC=tiles.bc, TH=tiles.th,
                    TW=tiles.tw)
        io = {'x_ptr': '*bf16', 'out_ptr': '*bf16', 'g_ptr': '*bf16', 'dx_ptr': '*bf16', 'seed_ptr': '*i64',
              'mask_rep': '*i8', 'seed_rep': '*i8'}
        variants = [
            ('stats approx', kernels.fmd_stats_kernel, dict(EXACT=False, **mask), {**io, 'g_ptr': '*fp32'}),
            ('stats exact', kernels.fmd_stats_kernel, dict(EXACT=True, **mask), {**io, 'g_ptr': '*fp32'}),
            ('finalize', kernels.fmd_finalize_kernel,
             dict(EXACT=False, HAS_KM=True, SIGNED=True, REPORT=False, PB=1024, CB=64, WINP=16), io),
            ('apply approx', kernels.fmd_apply_kernel, dict(EXACT=False, REPORT=False, **mask), io),
            ('apply exact', kernels.fmd_apply_kernel, dict(EXACT=True, REPORT=False, **mask), io),
            ('grad', kernels.fmd_grad_kernel, dict(mask), io),
        ]
        for name, fn, constexprs, types in variants:
            if name == 'finalize' and rows and any(r['kernel'] == 'finalize' for r in rows):
                continue  # shape-independent
            warps = 4 if name == 'finalize' else num_warps(tiles)
            usage = compile_kernel(fn, types, constexprs, capability, warps)
            rows.append(dict(kernel=name, shape=shape, tile=(tiles.bc, tiles.th, tiles.tw), warps=warps, **usage))
    return rows


def main() -> None:
    import triton
    print(f'triton {triton.__version__}, sm_90, bf16 channels_last, block 7, tiles from fused.plan')
    print(f"{'kernel':<14} | {'shape':<20} | {'tile (C,H,W)':<14} | warps | regs | spill st | spill ld")
    for r in kernel_resources():
        print(f"{r['kernel']:<14} | {str(r['shape']):<20} | {str(r['tile']):<14} | {r['warps']:5d} | "
              f"{r['registers']:4d} | {r['spill_stores']:8d} | {r['spill_loads']:8d}")


if __name__ == '__main__':
    main()
