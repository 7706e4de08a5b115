"""GPU check of fastsmooth's Triton kernels (run by bench/gpu_check; needs a CUDA device).

1. Agreement: the GPU kernels' noisy copies for fixed seeds against (a) Triton's interpreter on the
   CPU (a subprocess with TRITON_INTERPRET=1) and (b) the pure-torch reference: integers of the
   Philox stream bit for bit (Uniform noise with x = 0, lambda = 1 is exactly S32 of the words),
   float32 within the rounding of the GPU's approximate transcendental functions, bfloat16 /
   float16 within one ulp. ExpInf's per-copy radius compared on its own.
2. Voting against torch (argmax + bincount), NaN rows included.
3. Bandwidth of the noise kernel per noise, dtype and layout: bytes = x read once + the copies
   written, against a device-to-device copy (read + write) of a large tensor, timed with CUDA events
   (triton.testing.do_bench). A short table is printed last.

    python3 bench/gpu_check.py [--quick]          # on a CUDA machine
    python3 bench/gpu_check.py --interpret-dump F  # (internal) the interpreter's copies, to F
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

SEED = 2 ** 40 + 17
IMAGE_INDEX, FIRST_COPY, COPIES = 3, 1000, 32
SHAPE = (3, 32, 32)
NOISE_SPECS = {
    "gaussian": dict(name="gaussian", sigma=0.5),
    "laplace": dict(name="laplace", sigma=0.5),
    "uniform": dict(name="uniform", scale=1.0),
    "expinf1": dict(name="expinf", k=1.0, sigma=0.5),
    "expinf_boost": dict(name="expinf", k=8192.0, scale=0.5),
}
DTYPE_NAMES = ("float32", "bfloat16", "float16")


def agreement_cases(device):
    """{case: tensor} of the kernels' copies on ``device`` (moved to the CPU)."""
    import torch

    from fastsmooth.kernels import perturb
    from fastsmooth.noises import make_noise

    x = torch.rand(SHAPE, generator=torch.Generator().manual_seed(0))
    zero = torch.zeros(SHAPE)
    out = {}
    for key, spec in NOISE_SPECS.items():
        noise = make_noise(**spec)
        for dname in DTYPE_NAMES:
            dtype = getattr(torch, dname)
            out[f"{key}/{dname}"] = perturb(x.to(device), COPIES, noise, SEED, image_index=IMAGE_INDEX,
                                            first_copy=FIRST_COPY, out_dtype=dtype).cpu()
        out[f"{key}/eps"] = perturb(zero.to(device), COPIES, noise, SEED, image_index=IMAGE_INDEX,
                                    first_copy=FIRST_COPY).cpu()
    return out, x


def reference_cases(x):
    import torch

    from fastsmooth.kernels import noise_reference, perturb_reference
    from fastsmooth.noises import make_noise

    out = {}
    for key, spec in NOISE_SPECS.items():
        noise = make_noise(**spec)
        for dname in DTYPE_NAMES:
            out[f"{key}/{dname}"] = perturb_reference(x, COPIES, noise, SEED, image_index=IMAGE_INDEX,
                                                      first_copy=FIRST_COPY, out_dtype=getattr(torch, dname))
        out[f"{key}/eps"] = noise_reference(noise, SHAPE, SEED, IMAGE_INDEX, FIRST_COPY, COPIES)
    return out


def compare(a, b):
    """(identical fraction, max abs diff, max diff in ulps of the dtype at b)."""
    # ulps of float32 are counted at magnitude >= 1
    import torch

    a32, b32 = a.float(), b.float()
    diff = (a32 - b32).abs()
    fi = torch.finfo(a.dtype)
    # the spacing of a.dtype at b (float32: at max(|b|, 1), as x + eps is of order 1)
    mag = b32.abs().clamp(min=1.0 if a.dtype == torch.float32 else fi.tiny)
    ulp = fi.eps * torch.exp2(torch.frexp(mag).exponent.float() - 1)
    same = float((a32 == b32).float().mean())
    return same, float(diff.max()), float((diff / ulp).max())


def check_agreement(interp_file, device="cuda"):
    import torch

    gpu, x = agreement_cases(device)
    ref = reference_cases(x)
    interp = torch.load(interp_file) if interp_file and os.path.exists(interp_file) else None
    rows, ok = [], True
    for case in gpu:
        for name, other in (("interpreter", interp), ("torch-ref", ref)):
            if other is None:
                continue
            same, dmax, ulps = compare(gpu[case], other[case])
            dtype = gpu[case].dtype
            if dtype == torch.float32:
                # float32: the GPU's exp/log/sin/cos/sqrt round differently from numpy's / torch's
                good = dmax <= 2e-6 * max(1.0, float(other[case].abs().max()))
            else:
                # one ulp of the half dtype, beyond the float32 difference (x + eps may cancel)
                a32, b32 = gpu[case].float(), other[case].float()
                fi = torch.finfo(dtype)
                mag = torch.maximum(a32.abs(), b32.abs()).clamp(min=fi.tiny)
                allowed = fi.eps * torch.exp2(torch.frexp(mag).exponent.float() - 1) + 2e-6 * b32.abs().clamp(min=1)
                good = bool(((a32 - b32).abs() <= allowed).all())
            ok &= good
            rows.append((case, name, same, dmax, ulps, "ok" if good else "FAIL"))
    # the Philox integers, bit for bit: Uniform, lambda = 1, x = 0 gives eps = S32(word) exactly
    words_exact = torch.equal(gpu["uniform/eps"], ref["uniform/eps"])
    ok &= words_exact
    # ExpInf's per-copy radius
    r_gpu = gpu["expinf1/eps"].reshape(COPIES, -1).abs().max(dim=1).values
    r_ref = ref["expinf1/eps"].reshape(COPIES, -1).abs().max(dim=1).values
    r_same = float((r_gpu == r_ref).float().mean())
    print("\n== agreement: GPU kernels vs Triton interpreter / torch reference "
          f"(seed {SEED}, image {IMAGE_INDEX}, copies {FIRST_COPY}..{FIRST_COPY + COPIES - 1}, shape {SHAPE})")
    print(f"{'case':24s} {'against':12s} {'identical':>9s} {'max|diff|':>10s} {'max ulps':>9s}")
    for case, name, same, dmax, ulps, verdict in rows:
        print(f"{case:24s} {name:12s} {same:9.4f} {dmax:10.2e} {ulps:9.2f}  {verdict}")
    print(f"Philox words bit-identical (uniform eps == S32(word)): {words_exact}")
    print(f"ExpInf radii identical: {r_same:.4f}")
    if interp is None:
        print("(interpreter dump missing: compared with the torch reference only)")
    return ok


def check_votes(device="cuda"):
    import torch

    from fastsmooth.kernels import vote, vote_reference

    ok = True
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for b, k in ((4096, 10), (1000, 1000), (64, 5000)):
            logits = torch.randint(-3, 4, (b, k), generator=g).to(dtype)
            logits[::97, 0] = float("nan")
            logits[5::101, -1] = float("inf")
            slots = torch.randint(0, 7, (b,), generator=g)
            c_ref, n_ref = torch.zeros(7, k, dtype=torch.int64), torch.zeros(1, dtype=torch.int64)
            vote_reference(logits, slots, c_ref, n_ref)
            c, n = c_ref.new_zeros(c_ref.shape).to(device), n_ref.new_zeros(1).to(device)
            vote(logits.to(device), slots.to(device), c, n)
            good = torch.equal(c.cpu(), c_ref) and torch.equal(n.cpu(), n_ref)
            ok &= good
            print(f"vote {str(dtype):15s} B={b:5d} K={k:5d} nonfinite={int(n_ref)}: {'ok' if good else 'FAIL'}")
    return ok


def bench_bandwidth(quick):
    import torch
    import triton

    from fastsmooth.kernels import perturb_packed, vote
    from fastsmooth.noises import make_noise

    do_bench = triton.testing.do_bench
    rows = []
    # device-to-device copy: read + write
    n_bytes = (256 if quick else 1024) << 20
    src = torch.empty(n_bytes // 4, dtype=torch.float32, device="cuda").uniform_()
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=10, rep=50)
    copy_gbs = 2 * n_bytes / ms / 1e6
    rows.append(("d2d copy (torch)", "-", "-", "-", copy_gbs, 100.0, float("nan")))
    del src, dst

    sizes = {"cifar": ((3, 32, 32), 16384), "imagenet": ((3, 224, 224), 512)}
    plan = []
    for noise in ("gaussian", "laplace", "uniform", "expinf"):
        for dname in DTYPE_NAMES:
            plan.append((noise, dname, "contig", "cifar"))
        plan.append((noise, "bfloat16", "chlast", "cifar"))
        if not quick:
            plan.append((noise, "bfloat16", "contig", "imagenet"))
            plan.append((noise, "bfloat16", "chlast", "imagenet"))
    for noise_name, dname, layout, size in plan:
        shape, batch = sizes[size]
        spec = {"name": noise_name, "sigma": 0.5}
        if noise_name == "expinf":
            spec["k"] = 1.0
        noise = make_noise(**spec)
        dtype = getattr(torch, dname)
        xs = torch.rand((1, *shape), device="cuda")
        out = torch.empty((batch, *shape), dtype=dtype, device="cuda")
        if layout == "chlast":
            out = out.to(memory_format=torch.channels_last)
        segs = [(0, 0, 0, batch, 0)]
        fn = lambda: perturb_packed(out, xs, segs, noise, 1)  # noqa: E731
        fn()
        ms = do_bench(fn, warmup=10, rep=50)
        moved = xs.numel() * 4 + out.numel() * out.element_size()
        gbs = moved / ms / 1e6
        rows.append((f"noise {noise_name}", dname, layout, f"{size} x{batch}", gbs, 100 * gbs / copy_gbs,
                     batch / ms * 1e3))
        del out, xs

    # the reference loop of Cohen et al. (x.repeat, randn_like * sigma, add, cast) for context
    shape, batch = sizes["cifar"]
    x = torch.rand(shape, device="cuda")

    def cohen():
        b = x.repeat((batch, 1, 1, 1))
        return (b + torch.randn_like(b) * 0.5).to(torch.bfloat16)

    ms = do_bench(cohen, warmup=5, rep=30)
    moved = x.numel() * 4 + batch * x.numel() * 2
    rows.append(("torch repeat+randn+add", "bfloat16", "contig", f"cifar x{batch}", moved / ms / 1e6,
                 100 * moved / ms / 1e6 / copy_gbs, batch / ms * 1e3))

    for dname in ("float32", "bfloat16"):
        for b, k in ((16384, 10), (4096, 1000)):
            logits = torch.randn(b, k, device="cuda").to(getattr(torch, dname))
            slots = torch.zeros(b, dtype=torch.int64, device="cuda")
            counts = torch.zeros(1, k, dtype=torch.int64, device="cuda")
            bad = torch.zeros(1, dtype=torch.int64, device="cuda")
            ms = do_bench(lambda: vote(logits, slots, counts, bad), warmup=10, rep=50)
            gbs = logits.numel() * logits.element_size() / ms / 1e6
            rows.append((f"vote K={k}", dname, "-", f"B={b}", gbs, 100 * gbs / copy_gbs, b / ms * 1e3))
    return rows


def sweep():
    """Tile-size sweep of the noise kernels, bf16 copies (tuning aid, not part of the check)."""
    import importlib

    import torch
    import triton

    from fastsmooth.noises import make_noise

    pk = importlib.import_module("fastsmooth.kernels.perturb")
    orig = pk.choose_config, pk.channels_last_config
    contig_cfgs = [(256, 1, 2), (128, 1, 1), (128, 1, 2), (256, 1, 4), (512, 1, 4), (256, 4, 4), (1024, 1, 8)]
    cl_cfgs = [(128, 2), (128, 4), (128, 8), (256, 4), (256, 8), (512, 8)]
    print("\n== tile sweep, GB/s (bf16 copies)")
    print("contiguous: P x ROWS / num_warps:  " + "".join(f"{p}x{r}/{w:<5d}" for p, r, w in contig_cfgs))
    print("channels-last: PG / num_warps:     " + "".join(f"{p}/{w:<8d}" for p, w in cl_cfgs))
    for name, shape, batch in (("gaussian", (3, 32, 32), 16384), ("uniform", (3, 32, 32), 16384),
                               ("expinf", (3, 32, 32), 16384), ("gaussian", (3, 224, 224), 512)):
        spec = {"name": name, "sigma": 0.5, **({"k": 1.0} if name == "expinf" else {})}
        noise = make_noise(**spec)
        xs = torch.rand((1, *shape), device="cuda")
        for layout in ("contig", "chlast"):
            out = torch.empty((batch, *shape), dtype=torch.bfloat16, device="cuda")
            if layout == "chlast":
                out = out.to(memory_format=torch.channels_last)
            line = f"{name}/{layout}/{shape[1]:<4d}"
            for cfg in (contig_cfgs if layout == "contig" else cl_cfgs):
                if layout == "contig":
                    pk.choose_config = lambda d, c, t, *a, cfg=cfg: {"P": cfg[0], "ROWS": cfg[1], "num_warps": cfg[2]}
                else:
                    pk.channels_last_config = lambda ch, t, *a, cfg=cfg: {"CP": triton.next_power_of_2(ch),
                                                                       "PG": cfg[0], "num_warps": cfg[1]}
                fn = lambda: pk.perturb_packed(out, xs, [(0, 0, 0, batch, 0)], noise, 1)  # noqa: E731
                fn()
                ms = triton.testing.do_bench(fn, warmup=5, rep=25)
                line += f" {(xs.numel() * 4 + out.numel() * 2) / ms / 1e6:10.0f}"
            pk.choose_config, pk.channels_last_config = orig
            print(line)


def print_table(rows, facts):
    print("\n== fastsmooth kernels on " + facts)
    print(f"{'kernel':24s} {'dtype':9s} {'layout':7s} {'size':16s} {'GB/s':>8s} {'% copy':>7s} {'copies/s':>10s}")
    for name, dname, layout, size, gbs, pct, rate in rows:
        rate_s = "-" if rate != rate else f"{rate:10.3e}"
        print(f"{name:24s} {dname:9s} {layout:7s} {size:16s} {gbs:8.0f} {pct:7.1f} {rate_s:>10s}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--interpret-dump", default=None)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--sweep", action="store_true", help="only a tile-size sweep (tuning aid)")
    ap.add_argument("--cpu-smoke", action="store_true", help="agreement and votes through the interpreter (no GPU)")
    ap.add_argument("--log-dir", default=os.environ.get("GPU_CHECK_LOG_DIR", "/tmp"))
    args = ap.parse_args()

    if args.interpret_dump:                       # child: Triton's interpreter on the CPU
        import torch

        cases, _ = agreement_cases("cpu")
        torch.save(cases, args.interpret_dump)
        return 0

    if args.cpu_smoke:                            # the script's own logic, without a GPU
        os.environ["TRITON_INTERPRET"] = "1"
        ok = check_agreement(None, "cpu") & check_votes("cpu")
        return 0 if ok else 1

    import torch
    import triton

    if not torch.cuda.is_available():
        print("gpu_check.py needs a CUDA device")
        return 2
    if args.sweep:
        sweep()
        return 0
    facts = (f"{torch.cuda.get_device_name()} | torch {torch.__version__} | triton {triton.__version__} | "
             f"CUDA {torch.version.cuda}")
    print(facts)

    dump = os.path.join(args.log_dir, "interpreter_copies.pt")
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    t0 = time.time()
    child = subprocess.run([sys.executable, __file__, "--interpret-dump", dump], env=env,
                           capture_output=True, text=True, timeout=240)
    print(f"interpreter run: exit {child.returncode} in {time.time() - t0:.0f}s")
    if child.returncode:
        print(child.stdout[-2000:], child.stderr[-4000:])

    ok_agree = check_agreement(dump if child.returncode == 0 else None)
    ok_votes = check_votes()
    rows = bench_bandwidth(args.quick)
    with open(os.path.join(args.log_dir, "gpu_check_bandwidth.json"), "w") as f:
        json.dump({"facts": facts, "rows": rows}, f, indent=1)
    print_table(rows, facts)
    print(f"\nagreement: {'ok' if ok_agree else 'FAIL'}   votes: {'ok' if ok_votes else 'FAIL'}")
    return 0 if ok_agree and ok_votes else 1


if __name__ == "__main__":
    sys.exit(main())
