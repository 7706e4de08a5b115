"""A whole certification run with default settings, compilation included (issue 15's yardstick):

    python3 bench/whole_run.py [--arch cifar_resnet20] [--images 10] [--n 100000] [--device cpu]

Random-weight model of the architecture, random CIFAR-shaped images; Smooth(...) with every setting
"auto" certifies the list (which announces its work, images x (n0 + n), to compile="auto"). Prints
the wall time from the engine's construction to the last certificate, the compile time in it, and
the choices the engine made.
"""

from __future__ import annotations

import argparse
import os
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="cifar_resnet20")
    ap.add_argument("--images", type=int, default=10)
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--device", default=None)
    args = ap.parse_args()
    import torch

    import fastsmooth
    from fastsmooth.benchmark import make_model

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, k, shape, name = make_model(args.arch, None, 0.25, device)
    images = torch.rand((args.images, *shape), generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    smooth = fastsmooth.Smooth(model, k, fastsmooth.Gaussian(sigma=0.25), device=device)
    certs = list(smooth.certify_many(list(enumerate(images)), n0=100, n=args.n))
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    m = smooth.metadata
    copies = args.images * (100 + args.n)
    print(f"{name}: {len(certs)} images at n = {args.n:,}: {seconds:.1f} s, compile {m['compile_seconds']:.1f} s "
          f"(compile={m['compile']}, {m['precision']}, channels_last={m['channels_last']}, "
          f"micro_batch={m['micro_batch']}, threads {m['tuning'].get('threads')}); {copies / seconds:,.0f} copies/s "
          f"overall; load {', '.join(f'{v:.1f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
