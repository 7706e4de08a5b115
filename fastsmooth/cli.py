"""`fastsmooth certify | predict | train | analyze | bench`.

certify and predict take Cohen et al.'s arguments and defaults (certify.py / predict.py), both in
fastsmooth's form (`fastsmooth certify --samples 100000`, everything optional, the embedded default
data and model) and in Cohen's positional form (`fastsmooth certify DATASET CHECKPOINT SIGMA OUTFILE`).
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import os
import sys
import time

import torch

LOCAL_ERRORS = (ValueError, TypeError, OSError, KeyError)


class CliError(Exception):
    """Bad input from the command line: one line on standard error, exit status 2."""


def _add_sampling_arguments(p: argparse.ArgumentParser, certify: bool) -> None:
    p.add_argument("dataset_pos", nargs="?", metavar="DATASET", help="Cohen's positional form: data set")
    p.add_argument("model_pos", nargs="?", metavar="CHECKPOINT", help="Cohen's positional form: checkpoint")
    p.add_argument("sigma_pos", nargs="?", metavar="SIGMA", type=float, help="Cohen's positional form: sigma")
    p.add_argument("out_pos", nargs="?", metavar="OUTFILE", help="Cohen's positional form: output TSV")
    p.add_argument("--dataset", default=None, help="data set (default: the embedded 'mnist')")
    p.add_argument("--data-root", default=None, help="folder holding the data set's files")
    p.add_argument("--split", default="test", choices=["train", "test"], help="data split (default test)")
    p.add_argument("--model", default=None, help="checkpoint {'arch','state_dict'} (default: the embedded "
                   "model, trained on first use with the noise being certified, then cached)")
    p.add_argument("--noise", default=None, help="gaussian | laplace | uniform | expinf (default: the "
                   "checkpoint's, else gaussian)")
    scale = p.add_mutually_exclusive_group()
    scale.add_argument("--sigma", type=float, default=None, help="per-coordinate RMS of the noise (default 0.25)")
    scale.add_argument("--scale", type=float, default=None, help="lambda of the noise density")
    p.add_argument("--k", type=float, default=None, help="ExpInf's exponent k (default 1)")
    if certify:
        p.add_argument("--norm", default=None, choices=["l1", "l2", "linf"],
                       help="radius norm (default: the noise's own, l2 Gaussian, l1 others)")
        p.add_argument("--n0", "--N0", dest="n0", type=int, default=100, help="selection copies (default 100)")
    p.add_argument("--samples", "--N", dest="n", type=int, default=100_000, help="copies per image (default 100000)")
    p.add_argument("--alpha", type=float, default=0.001, help="failure probability (default 0.001)")
    p.add_argument("--batch", type=int, default=1000, help="copies per forward batch (default 1000)")
    p.add_argument("--skip", type=int, default=1, help="certify every skip-th image (default 1)")
    p.add_argument("--max", type=int, default=-1, help="stop at this image index (default -1: all)")
    p.add_argument("--out", default=None, help="output TSV (default: standard output)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted --out file")
    p.add_argument("--force", action="store_true", help="overwrite an existing --out file")
    p.add_argument("--seed", type=int, default=0, help="noise seed (default 0)")
    p.add_argument("--backend", default="auto", choices=["auto", "torch", "triton"])
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on standard error")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastsmooth", description="Fast, sound randomized-smoothing certification.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_sampling_arguments(sub.add_parser("certify", help="certify images (Cohen's CERTIFY)"), certify=True)
    _add_sampling_arguments(sub.add_parser("predict", help="predict images (Cohen's PREDICT)"), certify=False)
    for name, module, text in (("train", "train", "train a model with noise (SmoothAdv, stability)"),
                               ("analyze", "analyze", "certified-accuracy tables and curves from TSV files"),
                               ("bench", "benchmark", "throughput of fastsmooth against the bare model")):
        try:
            mod = importlib.import_module(f"fastsmooth.{module}")
        except ImportError:
            continue
        if hasattr(mod, "add_arguments"):
            mod.add_arguments(sub.add_parser(name, help=text))
    return parser


def _resolve(args: argparse.Namespace) -> None:
    """Fold Cohen's positional form into the named options; check what argparse cannot."""
    args.cohen = args.dataset_pos is not None
    if args.cohen:
        if args.sigma_pos is None:
            raise CliError("Cohen's positional form is DATASET CHECKPOINT SIGMA [OUTFILE]")
        args.dataset, args.model, args.sigma = args.dataset_pos, args.model_pos, args.sigma_pos
        args.out = args.out_pos if args.out_pos is not None else args.out
    for name in ("n", "batch", "skip") + (("n0",) if hasattr(args, "n0") else ()):
        if getattr(args, name) <= 0:
            flag = {"n": "--samples", "n0": "--n0"}.get(name, f"--{name}")
            raise CliError(f"{flag} must be > 0, got {getattr(args, name)}")
    if not 0.0 < args.alpha < 1.0:
        raise CliError(f"--alpha must lie in (0, 1), got {args.alpha}")
    if args.resume and args.force:
        raise CliError("--resume and --force exclude each other")
    if args.resume and args.out is None:
        raise CliError("--resume needs --out")


def _setup(args):
    """(smooth, dataset, metadata) for certify/predict."""
    from . import data, embedded, models
    from .noises import make_noise
    from .smooth import Smooth

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.dataset is not None and args.dataset not in data.DATASETS:
        raise CliError(f"unknown dataset {args.dataset!r}; known: {', '.join(sorted(data.DATASETS))}")
    ckpt_meta = {}
    if args.model is not None:
        # The checkpoint knows its data set (normalization, classes) unless --dataset overrides it.
        model, ckpt_meta = models.load_checkpoint(args.model, dataset=args.dataset, device=device)
    dataset_name = args.dataset or ckpt_meta.get("dataset") or "mnist"
    spec = dict(ckpt_meta.get("noise") or {})
    if args.noise is not None and args.noise != spec.get("name"):
        spec = {"name": args.noise}
    spec.setdefault("name", "gaussian")
    if args.sigma is not None or args.scale is not None:
        spec.pop("sigma", None), spec.pop("scale", None)
        spec.update({"sigma": args.sigma} if args.sigma is not None else {"scale": args.scale})
    if "sigma" not in spec and "scale" not in spec:
        spec["sigma"] = 0.25
    if args.k is not None:
        spec["k"] = args.k
    noise = make_noise(**spec)
    if args.model is None:
        if dataset_name != "mnist":
            raise CliError(f"there is no embedded model for {dataset_name!r}: pass --model CHECKPOINT")
        model = embedded.default_model(noise, device=device, progress=not args.no_progress)
    dataset = data.get_dataset(dataset_name, split=args.split, root=args.data_root)
    num_classes = ckpt_meta.get("num_classes") or dataset.info.num_classes
    smooth = Smooth(model, num_classes, noise, backend=args.backend, precision=args.precision,
                    seed=args.seed, device=device)
    if len(dataset):
        smooth.sampler.prepare(dataset[0][0].shape)  # resolve precision="auto" before the metadata
    meta = {"command": args.command, "dataset": dataset_name, "split": args.split,
            "model": os.path.abspath(args.model) if args.model else "embedded", **smooth.metadata,
            "alpha": args.alpha, "n": args.n, "batch": args.batch, "skip": args.skip, "max": args.max,
            "fastsmooth": _version(), "torch": torch.__version__}
    if args.command == "certify":
        meta.update(n0=args.n0, norm=args.norm or noise.default_norm)
    return smooth, dataset, meta


def _version() -> str:
    from . import __version__
    return __version__


def _indices(args, size: int, done: set) -> list:
    """Cohen's loop: every skip-th index, stopping at index --max; minus the rows already written."""
    stop = size if args.max < 0 else min(size, args.max)
    return [i for i in range(0, stop, args.skip) if i not in done]


def _progress(total: int, disable: bool, copies_per_image: int):
    from tqdm import tqdm

    bar = tqdm(total=total, unit="img", file=sys.stderr, disable=disable, dynamic_ncols=True)
    start = time.perf_counter()

    def step():
        bar.update(1)
        elapsed = max(time.perf_counter() - start, 1e-9)
        bar.set_postfix_str(f"{bar.n * copies_per_image / elapsed:,.0f} copies/s", refresh=False)

    return bar, step


def run_sampling(args) -> int:
    from .results import CERTIFY_COLUMNS, PREDICT_COLUMNS, ResultWriter, format_radius, format_time

    _resolve(args)
    smooth, dataset, meta = _setup(args)
    certify = args.command == "certify"
    columns = CERTIFY_COLUMNS if certify else PREDICT_COLUMNS
    meta["started"] = datetime.datetime.now().isoformat(timespec="seconds")
    with ResultWriter(args.out, columns, metadata=meta, resume=args.resume, force=args.force) as writer:
        indices = _indices(args, len(dataset), writer.done)
        labels = {}

        def items():
            for i in indices:
                x, label = dataset[i]
                labels[i] = int(label)
                yield i, x

        copies = (args.n0 + args.n) if certify else args.n
        bar, step = _progress(len(indices), args.no_progress, copies)
        if certify:
            results = smooth.certify_many(items(), n0=args.n0, n=args.n, alpha=args.alpha,
                                          batch_size=args.batch, norm=args.norm)
        else:
            results = smooth.predict_many(items(), n=args.n, alpha=args.alpha, batch_size=args.batch)
        with bar:
            for r in results:
                label = labels.pop(r.image_index)
                row = {"idx": r.image_index, "label": label, "predict": r.prediction,
                       "correct": int(r.prediction == label), "time": format_time(r.seconds, args.cohen)}
                if certify:
                    row.update(radius=format_radius(r.radius, args.cohen), p_lower=f"{r.p_lower:.6f}",
                               n_a=int(r.counts[r.counts0.argmax()]), n=r.n, norm=r.norm)
                writer.write(row)
                step()
    return 0


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command in ("certify", "predict"):
            return run_sampling(args)
        return args.run(args) if hasattr(args, "run") else _module_run(args)
    except KeyboardInterrupt:
        print("fastsmooth: interrupted", file=sys.stderr)
        return 130
    except (CliError, *LOCAL_ERRORS, _nonfinite_error()) as exc:
        if args.debug:
            raise
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"fastsmooth {args.command}: error: {message}", file=sys.stderr)
        return 2


def _module_run(args) -> int:
    module = {"train": "train", "analyze": "analyze", "bench": "benchmark"}[args.command]
    return importlib.import_module(f"fastsmooth.{module}").run(args)


def _nonfinite_error():
    from .sampler import NonFiniteLogitsError
    return NonFiniteLogitsError


if __name__ == "__main__":
    sys.exit(main())
