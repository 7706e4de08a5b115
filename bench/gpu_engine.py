"""Engine checks for bench/gpu_check (issue 15): the batch that fills the GPU, certify eager against
compiled, and row-for-row comparison of two result files. Runs on a CPU too, at small sizes (the
test suite does, so that the script at least runs before a GPU is lent).

    python3 bench/gpu_engine.py batch-sweep [--arch cifar_resnet110] [--copies 100000] [--json F]
    python3 bench/gpu_engine.py compare-rows A.tsv B.tsv       # equal in every column but time

batch-sweep: (1) the engine's eager forward at doubling batch sizes up to half the free GPU memory
(Sampler.batch_size_for, the choice of --batch auto; the per-copy memory and every size's copies/s
are printed); (2) one image certified at n copies with batch 1000 and with the chosen batch, eager;
(3) the same with torch.compile on (cold or warm compile cache: the compile time is printed apart).
The goal on an H100/H200 (issue 15): a CIFAR ResNet-110 image at n = 100,000 in <= 0.5 s.
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def _certify_seconds(smooth, x, n: int, batch: int, rounds: int = 2) -> float:
    """Best of ``rounds`` certify calls of one image (after one warm-up), device-synchronized."""
    import torch

    best = float("inf")
    for r in range(rounds + 1):
        torch.cuda.synchronize() if x.is_cuda else None
        start = time.perf_counter()
        smooth.certify(x, n0=100, n=n, batch_size=batch, image_index=0)
        torch.cuda.synchronize() if x.is_cuda else None
        if r:
            best = min(best, time.perf_counter() - start)
    return best


def batch_sweep(arch: str, dataset, copies: int, device: str, compile_too: bool) -> dict:
    import torch

    from fastsmooth import Gaussian, Smooth
    from fastsmooth.benchmark import make_model

    model, k, shape, name = make_model(arch, dataset, 0.25, device)
    x = torch.rand(shape, generator=torch.Generator().manual_seed(0)).to(device)
    out = {"model": name, "device": device, "copies": copies}
    eager = Smooth(model, k, Gaussian(sigma=0.25), device=device, compile="off")
    start = time.perf_counter()
    batch = eager.sampler.batch_size_for(shape)
    out["batch_search_seconds"] = time.perf_counter() - start
    out["batch"] = batch
    out["batch_details"] = eager.sampler.tuning.get("batch", {})
    rows = []
    for b in sorted({1000, batch}):
        rows.append(("eager", b, _certify_seconds(eager, x, copies, b), 0.0))
    if compile_too:
        compiled = Smooth(model, k, Gaussian(sigma=0.25), device=device, compile="on")
        compiled.sampler.prepare(shape, batch)  # compiles (its cost apart)
        rows.append(("compiled", batch, _certify_seconds(compiled, x, copies, batch),
                     compiled.sampler.compile_seconds))
        out["compiled_engine"] = compiled.metadata
    out["certify"] = [{"mode": m, "batch": b, "seconds": s, "copies_per_s": (copies + 100) / s,
                       "compile_seconds": c} for m, b, s, c in rows]
    out["engine"] = eager.metadata
    return out


def print_sweep(out: dict) -> None:
    details = out.get("batch_details") or {}
    print(f"\n== batch that fills the device: {out['model']} on {out['device']}")
    if "per_copy_bytes" in details:
        print(f"per-copy memory {details['per_copy_bytes'] / 2**20:.2f} MiB, free {details['free_bytes'] / 2**30:.1f} GiB, "
              f"search {out['batch_search_seconds']:.1f} s")
        for size, spc in sorted(details.get("seconds_per_copy", {}).items(), key=lambda kv: int(kv[0])):
            mark = "  <- chosen" if int(size) == out["batch"] else ""
            print(f"  eager forward, batch {int(size):>7,}: {1 / spc:>12,.0f} copies/s{mark}")
    else:
        print(f"batch {out['batch']} (no search on this device)")
    print(f"\n== certify one image, n = {out['copies']:,} (+ n0 100)")
    print(f"{'mode':10s} {'batch':>8s} {'seconds':>9s} {'copies/s':>12s} {'compile s':>10s}")
    for r in out["certify"]:
        print(f"{r['mode']:10s} {r['batch']:>8,} {r['seconds']:>9.3f} {r['copies_per_s']:>12,.0f} {r['compile_seconds']:>10.1f}")


def _rows(path: str) -> list:
    with open(path) as f:
        table = [line.rstrip("\n").split("\t") for line in f if line.strip()]
    drop = table[0].index("time") if "time" in table[0] else None
    return [[v for i, v in enumerate(r) if i != drop] for r in table]


def compare_rows(a: str, b: str) -> bool:
    """Whether two result files hold the same rows in every column but time."""
    ra, rb = _rows(a), _rows(b)
    same = ra == rb
    print(f"rows of {a} and {b} (every column but time): {'equal' if same else 'DIFFERENT'} "
          f"({len(ra) - 1} and {len(rb) - 1} rows)")
    if not same:
        for x, y in zip(ra, rb):
            if x != y:
                print(f"  first difference: {x} | {y}")
                break
    return same


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    sw = sub.add_parser("batch-sweep")
    sw.add_argument("--arch", default="cifar_resnet110")
    sw.add_argument("--dataset", default=None)
    sw.add_argument("--copies", type=int, default=100_000)
    sw.add_argument("--device", default=None)
    sw.add_argument("--no-compile", action="store_true", help="skip the compiled certify")
    sw.add_argument("--json", default=None)
    cmp_ = sub.add_parser("compare-rows")
    cmp_.add_argument("a")
    cmp_.add_argument("b")
    args = ap.parse_args(argv)
    if args.command == "compare-rows":
        return 0 if compare_rows(args.a, args.b) else 1
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    out = batch_sweep(args.arch, args.dataset, args.copies, device, not args.no_compile)
    print_sweep(out)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
