"""Compile the kernels' launch variants for a CUDA GPU on a machine without one.

Triton's interpreter (DESIGN §7) runs a kernel's Python on numpy arrays. It checks what the kernel
computes, not that it lowers: code the interpreter accepts can still fail to compile on a GPU (a
branch whose two sides yield different types, a reduction Triton cannot lower, an unsupported
cast). This module compiles every variant the launchers of perturb.py and vote.py choose, for a given
architecture, through Triton's whole pipeline (TTIR, TTGIR, LLVM, PTX, then a cubin from the ptxas
in the triton wheel). A kernel that would not build on an H100 therefore fails here, on any machine.

Triton must be imported without TRITON_INTERPRET, so this runs in its own process:

    python -m fastsmooth.kernels.cross_compile [--arch 90] [--list]

It prints one line per variant and exits 1 if any variant fails to compile. Integer arguments are
typed i32 (one variant types them all i64, as a launch does for values >= 2^31, such as large seeds
and image or copy indices); values are not specialized (no divisibility hints), so the code may
differ slightly from what a launch on a GPU generates: the check is that it lowers, not how fast it
runs.
"""

from __future__ import annotations

import argparse
import sys
import time

INT32 = "i32"
POINTER = {"float32": "*fp32", "bfloat16": "*bf16", "float16": "*fp16"}
NOISES = ("gaussian", "laplace", "uniform", "expinf")
# (shape of a copy, output dtype, layout): the engine's CIFAR batch (bf16, channels_last), plain
# contiguous copies in float32, a strided copy layout in float16, and a small input (d < 128).
CASES = (((3, 32, 32), "bfloat16", "channels_last"), ((3, 32, 32), "float32", "contiguous"),
         ((3, 224, 224), "float16", "strided"), ((1, 8, 8), "bfloat16", "contiguous"))


def _perturb_variants():
    """(label, kernel, signature, constexprs, options) of the perturbation kernels, with the tile
    configurations and compiler options that ``perturb_packed`` uses on CUDA, in float mode and on
    the grid (int32 grid indices in, alias tables or ExpInf's float64 rounding)."""
    import importlib
    import math

    pk = importlib.import_module("fastsmooth.kernels.perturb")  # the module: the package's `perturb` is a function
    from fastsmooth.kernels.samplers import MAX_GAMMA_ITERATIONS, NOISE_IDS

    wide = None
    for noise in NOISES:
        boosts = (False, True) if noise == "expinf" else (False,)
        for (shape, dtype, layout) in CASES:
            dim = math.prod(shape)
            for boost in boosts:
                for grid in (0, 1):
                    label = (f"perturb {noise}{' boost' if boost else ''}{' grid' if grid else ''} {dtype} {layout} "
                             f"{'x'.join(map(str, shape))}")
                    common = dict(x_ptr="*i32" if grid else POINTER["float32"], out_ptr=POINTER[dtype],
                                  params_ptr="*fp64", t_hi_ptr="*i32", t_lo_ptr="*i32", alias_ptr="*i32", lam="fp32",
                                  k0="i64", k1=INT32, domain=INT32, slot=INT32, image=INT32, first_copy=INT32)
                    flags = dict(NOISE=NOISE_IDS[noise], BOOST=boost, MAX_IT=MAX_GAMMA_ITERATIONS, BF16_BITS=False,
                                 GRID=grid, BITS=12)
                    if layout == "channels_last":
                        cfg = pk.channels_last_config(shape[0], "cuda", noise)
                        sig = dict(common, row0=INT32, D=INT32, C=INT32, HW=INT32, s0=INT32, grid_value="fp32",
                                   offset=INT32)
                        const = dict(flags, CP=cfg["CP"], PG=cfg["PG"])
                        yield label, pk._perturb_cl_kernel, sig, const, dict(pk.CUDA_OPTIONS, num_warps=cfg["num_warps"])
                    else:
                        cfg = pk.choose_config(dim, 1000, "cuda", noise)
                        sig = dict(common, count=INT32, row0=INT32, D=INT32, D2=INT32, D3=INT32, s0=INT32,
                                   s1=INT32, s2=INT32, s3=INT32, grid_value="fp32", offset=INT32)
                        const = dict(flags, ROWS=cfg["ROWS"], P=cfg["P"], CONTIG=layout == "contiguous")
                        options = dict(pk.CUDA_OPTIONS, num_warps=cfg["num_warps"])
                        if wide is None and layout == "contiguous" and noise == "laplace":
                            wide = (label + " i64", pk._perturb_kernel,
                                    {k: "i64" if v == INT32 else v for k, v in sig.items()}, const, options)
                        yield label, pk._perturb_kernel, sig, const, options
    yield wide


def _vote_variants():
    import importlib

    vk = importlib.import_module("fastsmooth.kernels.vote")
    for dtype in POINTER:
        for classes in (10, 1000):
            rows, block, warps = vk.launch_config(1000, classes, "cuda")
            sig = dict(logits_ptr=POINTER[dtype], slots_ptr="*i64", counts_ptr="*i64", nonfinite_ptr="*i64",
                       B=INT32, K=INT32, stride_b=INT32, stride_k=INT32, stride_cm=INT32, stride_ck=INT32)
            yield f"vote {dtype} K={classes}", vk._vote_kernel, sig, dict(ROWS=rows, BK=block), {"num_warps": warps}


def variants():
    yield from _perturb_variants()
    yield from _vote_variants()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=int, default=90, help="CUDA compute capability x 10 (default 90: H100/H200)")
    ap.add_argument("--list", action="store_true", help="list the variants and exit")
    args = ap.parse_args(argv)
    import triton

    from .perturb import interpreting
    if interpreting():
        print("cross_compile: unset TRITON_INTERPRET (the interpreter replaces the compiler)", file=sys.stderr)
        return 2
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", args.arch, 32)
    failed = 0
    for label, kernel, sig, const, options in variants():
        if args.list:
            print(label)
            continue
        start = time.perf_counter()
        try:
            compiled = triton.compile(ASTSource(kernel, {**sig, **{k: "constexpr" for k in const}}, const),
                                      target=target, options=options)
            size = len(compiled.asm["cubin"])
            print(f"ok    sm_{args.arch}  {label}  ({size:,} bytes of cubin, {time.perf_counter() - start:.1f} s)")
        except Exception as exc:  # report every failing variant, not only the first
            failed += 1
            first = str(exc).strip().splitlines()
            print(f"FAIL  sm_{args.arch}  {label}: {type(exc).__name__}: {first[0] if first else ''}")
            print(str(exc)[-3000:], file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
