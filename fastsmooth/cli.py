"""`fastsmooth certify | predict | train | analyze | bench`.

certify and predict take Cohen et al.'s arguments and defaults (certify.py / predict.py), both in
fastsmooth's form (`fastsmooth certify --samples 100000`, everything optional, the embedded default
data and model) and in Cohen's positional form (`fastsmooth certify DATASET CHECKPOINT SIGMA OUTFILE`).

Under torchrun (`torchrun --nproc_per_node=N -m fastsmooth certify ... --out OUT`) the images are
shared dynamically among the processes and rank 0 merges their rows into OUT (fastsmooth/distributed.py).
`--resume` continues an interrupted OUT (single or many processes). Bad input gets one line on
standard error (`fastsmooth certify: error: ...`) and exit status 2, and no output file is created
before the model and the data have loaded and the model has accepted an input.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import math
import os
import sys
import time

import torch
from torch import nn

from .allocator import tune_cpu_allocator
from .distributed import PeerFailed
from .checks import first_line, positive_float

LOCAL_ERRORS = (ValueError, TypeError, OSError, KeyError)


class CliError(Exception):
    """Bad input from the command line: one line on standard error, exit status 2."""


class ModelError(RuntimeError):
    """The base classifier's forward failed (a RuntimeError, so CUDA-graph capture falls back on it)."""


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors on one line (`fastsmooth certify: error: ...`, exit status 2)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def _add_sampling_arguments(p: argparse.ArgumentParser, certify: bool) -> None:
    p.add_argument("dataset_pos", nargs="?", metavar="DATASET", help="Cohen's positional form: data set")
    p.add_argument("model_pos", nargs="?", metavar="CHECKPOINT", help="Cohen's positional form: checkpoint")
    p.add_argument("sigma_pos", nargs="?", metavar="SIGMA", type=float, help="Cohen's positional form: sigma")
    p.add_argument("out_pos", nargs="?", metavar="OUTFILE", help="Cohen's positional form: output TSV")
    p.add_argument("--dataset", default=None, help="data set (default: the embedded 'mnist')")
    p.add_argument("--data-root", default=None, help="folder holding the data set's files")
    p.add_argument("--split", default="test", choices=["train", "test"], help="data split (default test)")
    p.add_argument("--model", default=None, help="checkpoint {'arch','state_dict'} (default: the embedded "
                   "model, trained on first use with the noise being certified, then cached), or "
                   "MODULE:FACTORY, a Python function of yours that returns the model (an nn.Module on "
                   "[0, 1] inputs; MODULE is imported from the current directory or PYTHONPATH)")
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
        mode = p.add_mutually_exclusive_group()
        mode.add_argument("--radii", nargs="+", type=float, default=None, metavar="R",
                          help="sequential: certify the largest of these radii that --samples votes can, "
                          "each image stopping as soon as that is known (the radius column is that target)")
        mode.add_argument("--sequential", action="store_true",
                          help="sequential: the full radius, each image stopping when going on to --samples "
                          "votes would raise it by less than --tolerance")
        p.add_argument("--tolerance", type=float, default=None,
                       help="--sequential: relative radius gain below which an image stops (default 0.01)")
    p.add_argument("--samples", "--N", dest="n", type=int, default=100_000, help="copies per image (default 100000)")
    p.add_argument("--alpha", type=float, default=0.001, help="failure probability (default 0.001)")
    p.add_argument("--batch", type=batch_arg, default="auto", help="copies per forward batch (default auto: 1000 "
                   "on a CPU, on a GPU the batch that fills it, measured up to half its free memory)")
    p.add_argument("--skip", type=int, default=1, help="certify every skip-th image (default 1)")
    p.add_argument("--max", "--max-index", dest="max", type=int, default=-1,
                   help="stop at this image index (default -1: all); under torchrun write --max-index "
                   "(torchrun's own parser reads --max as an abbreviation of its --max-restarts)")
    p.add_argument("--out", default=None, help="output TSV (default: standard output; required under torchrun)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted --out file (and its "
                   "OUT.rankK.part files)")
    p.add_argument("--force", action="store_true", help="overwrite an existing --out file")
    p.add_argument("--seed", type=int, default=0, help="noise seed (default 0)")
    p.add_argument("--backend", default="auto", choices=["auto", "torch", "native", "triton"],
                   help="noise backend (default auto: triton on CUDA, native on a CPU)")
    p.add_argument("--input-grid", default="auto", type=input_grid_arg, metavar="auto|none|G",
                   help="form noisy inputs from integers on the grid k / G, sound in floating point "
                   "(default auto: the data set's pixel grid, 255 for 8-bit images, 16 for digits); none: "
                   "x + noise in float32, as public smoothing code does")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu; "
                   "under torchrun cuda:LOCAL_RANK)")
    p.add_argument("--compile", nargs="?", const="on", default="auto", choices=["auto", "on", "off"],
                   help="torch.compile the model: auto (default) when the run's work (images x copies) "
                   "amortizes the expected compile time, on (also a bare --compile), off; the choice and "
                   "its cost are recorded with the results; a model that fails to compile runs eagerly")
    p.add_argument("--micro-batch", type=_micro_batch, default="auto", help="copies per model call "
                   "(default auto: on a CPU, big models in cache-sized micro-batches; 0: the whole batch)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on standard error")


def input_grid_arg(text: str):
    """argparse type of --input-grid: auto, none or a positive integer G."""
    if text in ("auto", "none"):
        return text
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected auto, none or a positive integer, got {text!r}")
    return int(text)


def batch_arg(text: str):
    """argparse type of --batch: auto or an integer (checked > 0 later, with the other counts)."""
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected auto or a positive integer, got {text!r}") from None


def _micro_batch(text: str):
    if text == "auto":
        return text
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected auto or a non-negative integer, got {text!r}")
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fastsmooth", description="Fast, sound randomized-smoothing certification.")
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


def _check_positive_finite(flag: str, value) -> None:
    if value is not None:
        positive_float(value, flag)


def _resolve(args: argparse.Namespace) -> None:
    """Fold Cohen's positional form into the named options; check what argparse cannot."""
    from .noises import NOISES

    args.cohen = args.dataset_pos is not None
    if args.cohen:
        if args.sigma_pos is None:
            raise CliError("Cohen's positional form is DATASET CHECKPOINT SIGMA [OUTFILE]")
        if args.sigma is not None or args.scale is not None:
            raise CliError("Cohen's positional form gives SIGMA: drop --sigma / --scale")
        if args.out_pos is not None and args.out is not None:
            raise CliError("give the output file once: OUTFILE or --out")
        args.dataset, args.model, args.sigma = args.dataset_pos, args.model_pos, args.sigma_pos
        args.out = args.out_pos if args.out_pos is not None else args.out
    for name in ("n", "skip", "batch") + (("n0",) if hasattr(args, "n0") else ()):
        if name == "batch" and args.batch == "auto":
            continue
        if getattr(args, name) <= 0:
            flag = {"n": "--samples", "n0": "--n0"}.get(name, f"--{name}")
            raise CliError(f"{flag} must be > 0, got {getattr(args, name)}")
    if not 0.0 < args.alpha < 1.0:
        raise CliError(f"--alpha must lie in (0, 1), got {args.alpha}")
    if args.noise is not None and args.noise.lower() not in NOISES:
        raise CliError(f"unknown noise {args.noise!r}; expected one of {', '.join(NOISES)}")
    _check_positive_finite("--sigma" if not args.cohen else "SIGMA", args.sigma)
    _check_positive_finite("--scale", args.scale)
    _check_positive_finite("--k", args.k)
    if getattr(args, "radii", None) is not None:
        if any(not math.isfinite(r) or r < 0 for r in args.radii):
            raise CliError(f"--radii must be finite and >= 0, got {' '.join(map(str, args.radii))}")
    if hasattr(args, "tolerance"):
        if args.tolerance is not None and not args.sequential:
            raise CliError("--tolerance is the stopping tolerance of --sequential: add --sequential or drop it")
        _check_positive_finite("--tolerance", args.tolerance)
        args.tolerance = 0.01 if args.tolerance is None else args.tolerance
    if args.resume and args.force:
        raise CliError("--resume and --force exclude each other")
    if args.resume and args.out is None:
        raise CliError("--resume needs --out")


def _device(args, ctx) -> torch.device:
    """The torch device; under torchrun a bare "cuda" is cuda:LOCAL_RANK."""
    spec = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError) as exc:
        raise CliError(f"--device {spec!r} is not a torch device ({first_line(exc)})") from None
    if ctx is not None and device.type == "cuda" and device.index is None:
        device = torch.device("cuda", ctx.local_rank)
    try:
        torch.empty(1, device=device)
    except Exception as exc:  # "Torch not compiled with CUDA enabled" is an AssertionError
        raise CliError(f"--device {device} is not available here ({first_line(exc)})") from None
    return device


def _preflight_out(args) -> None:
    """Refuse a bad --out before any work: missing directory, existing file without --resume/--force."""
    from .results import existing_outputs

    out = args.out
    if out is None:
        return
    if os.path.isdir(out):
        raise CliError(f"--out {out} is a directory")
    directory = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(directory):
        raise CliError(f"--out {out}: the directory {directory} does not exist")
    if not os.access(directory, os.W_OK):
        raise CliError(f"--out {out}: the directory {directory} is not writable")
    if not args.resume and not args.force:
        present = existing_outputs(out)
        if present:
            raise CliError(f"{present[0]} exists; pass --resume to continue it or --force to overwrite it")


class _Guarded(nn.Module):
    """The base classifier, with a failing forward turned into one clear ModelError."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        try:
            return self.model(x)
        except Exception as exc:
            raise ModelError(f"the model failed on a batch of inputs of shape {tuple(x.shape)} "
                             f"({str(x.dtype).replace('torch.', '')}): {first_line(exc)}") from exc


def _probe(model: nn.Module, x: torch.Tensor, num_classes: int, dataset_name: str, device) -> None:
    """One forward of one clean image: the model must accept the data's shape and give K logits."""
    shape = tuple(x.shape)
    try:
        with torch.inference_mode():
            logits = model(x[None].to(device))
    except Exception as exc:
        raise CliError(f"the model rejects inputs of shape {shape} (data set {dataset_name}): "
                       f"{first_line(exc)}") from None
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.shape[0] != 1:
        got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise CliError(f"the model maps an input of shape (1, {', '.join(map(str, shape))}) to {got}; "
                       f"expected logits of shape (1, {num_classes})")
    if logits.shape[1] != num_classes:
        raise CliError(f"the model outputs {logits.shape[1]} logits but data set {dataset_name} has "
                       f"{num_classes} classes")


# The engine's "auto" choices that define the base classifier: recorded with the results, and taken
# from there by a resumed run and by every torchrun process but rank 0, so that their rows equal a
# single uninterrupted run's (the choices are timed, and timings differ from run to run).
ENGINE_CHOICES = ("precision", "channels_last", "micro_batch", "compile", "batch")


def _recorded_choices(out) -> dict:
    """The engine choices in OUT's metadata side file ({} when there is none)."""
    import json

    from .results import META_SUFFIX

    try:
        with open(out + META_SUFFIX, encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, ValueError, TypeError):
        return {}
    return {k: meta[k] for k in ENGINE_CHOICES if isinstance(meta, dict) and k in meta}


def _setup(args, device: torch.device, show_progress: bool = True, recorded=None, share: int = 1,
           on_choices=None):
    """(smooth, dataset, metadata) for certify/predict. ``recorded``: engine choices to reuse where
    the command line says "auto" (a resumed run's; or a function returning them, called once the
    model and data have loaded: rank 0's); ``share``: the processes sharing the images (the work this
    one announces to the engine is its share); ``on_choices(choices)``: called once the engine has
    made its choices, before it compiles (torchrun's rank 0 publishes them)."""
    from . import data, embedded, models
    from .noises import make_noise
    from .smooth import Smooth, expected_copies

    if args.dataset is not None:  # the names data.get_dataset takes (case, aliases such as cifar-10)
        try:
            args.dataset = data.canonical_name(args.dataset)
        except ValueError:
            raise CliError(f"unknown dataset {args.dataset!r}; known: {', '.join(sorted(data.DATASETS))}") from None
    ckpt_meta, model = {}, None
    factory = args.model is not None and models.is_factory_spec(args.model)
    if args.model is not None:
        if factory:
            model = models.load_factory(args.model)
        else:
            # The checkpoint knows its data set (normalization, classes) unless --dataset overrides it.
            model, ckpt_meta = models.load_checkpoint(args.model, dataset=args.dataset, device=device)
    dataset_name = args.dataset or ckpt_meta.get("dataset") or "mnist"
    spec = dict(ckpt_meta.get("noise") or {})
    if args.noise is not None and args.noise.lower() != spec.get("name"):
        spec = {"name": args.noise.lower()}
    spec.setdefault("name", "gaussian")
    if args.sigma is not None or args.scale is not None:
        spec.pop("sigma", None), spec.pop("scale", None)
        spec.update({"sigma": args.sigma} if args.sigma is not None else {"scale": args.scale})
    if "sigma" not in spec and "scale" not in spec:
        spec["sigma"] = 0.25
    if args.k is not None:
        if spec["name"] != "expinf":
            raise CliError(f"--k is ExpInf's exponent: it needs --noise expinf (the noise is {spec['name']})")
        spec["k"] = args.k
    noise = make_noise(**spec)
    # The data before the embedded model: a missing file is reported before minutes of training.
    dataset = data.get_dataset(dataset_name, split=args.split, root=args.data_root)
    if model is None:
        if dataset_name != "mnist":
            raise CliError(f"there is no embedded model for {dataset_name!r}: pass --model CHECKPOINT")
        model = embedded.default_model(noise, device=device, progress=show_progress and not args.no_progress)
    num_classes = dataset.info.num_classes or ckpt_meta.get("num_classes")
    if ckpt_meta.get("num_classes") and ckpt_meta["num_classes"] != num_classes:
        raise CliError(f"the checkpoint's model has {ckpt_meta['num_classes']} classes but data set "
                       f"{dataset_name} has {num_classes}")
    model = model.to(device).eval()
    first = dataset[0][0] if len(dataset) else None  # loaded once (an image folder decodes a file)
    if first is not None:
        _probe(model, first, num_classes, dataset_name, device)
    input_grid = {"auto": dataset.info.pixel_grid, "none": None}.get(args.input_grid, args.input_grid)
    if first is not None and input_grid is not None:
        from .grid import grid_indices
        try:
            grid_indices(first, input_grid)
        except ValueError as exc:
            raise CliError(f"--input-grid {input_grid}: the data set's first image is off the grid "
                           f"({first_line(exc)})") from None
    rec = (recorded() if callable(recorded) else recorded) or {}

    def choice(value, key):
        return rec[key] if value == "auto" and key in rec else value

    try:
        smooth = Smooth(_Guarded(model), num_classes, noise, backend=args.backend,
                        precision=choice(args.precision, "precision"), seed=args.seed, device=device,
                        channels_last=rec.get("channels_last", "auto"), compile=choice(args.compile, "compile"),
                        micro_batch=choice(args.micro_batch, "micro_batch"), input_grid=input_grid)
        args.batch = choice(args.batch, "batch")
        if first is not None:
            # Resolve the "auto" choices (and compile, if that pays for this run's work) before the
            # metadata is written: it must name the classifier the rows come from.
            if args.batch == "auto":
                args.batch = smooth.sampler.batch_size_for(first.shape)
            per_image = args.n if args.command == "predict" else expected_copies(args.n0, args.n, args.radii,
                                                                                args.sequential)
            smooth.expect(len(_indices(args, len(dataset), set())) * per_image // max(1, share))
            smooth.sampler.decide(first.shape, args.batch)
        elif args.batch == "auto":
            args.batch = 1000
        if on_choices is not None:
            on_choices({**{k: smooth.metadata[k] for k in ENGINE_CHOICES if k != "batch"}, "batch": args.batch})
        if first is not None:
            smooth.sampler.prepare(first.shape, args.batch)
    except RuntimeError as exc:  # e.g. the Triton backend without a GPU
        raise CliError(first_line(exc)) from None
    model_name = "embedded"
    if args.model is not None:
        model_name = args.model if factory else os.path.abspath(args.model)
    meta = {"command": args.command, "dataset": dataset_name, "split": args.split,
            "model": model_name, **smooth.metadata,
            "alpha": args.alpha, "n": args.n, "batch": args.batch, "skip": args.skip, "max": args.max,
            "fastsmooth": _version(), "torch": torch.__version__}
    if args.command == "certify":
        meta.update(n0=args.n0, norm=args.norm or noise.default_norm, **_mode_metadata(args))
    return smooth, dataset, meta


def _mode_metadata(args) -> dict:
    """How certify stops: fixed n (Cohen's CERTIFY), target radii or the anytime full radius; n is
    then the cap, and the bound the confidence sequence of stats.anytime_lower."""
    from .smooth import check_radii
    from .stats import CS_PRIOR_STRENGTH

    if args.radii is not None:
        mode = {"mode": "radii", "radii": check_radii(args.radii)}
    elif args.sequential:
        mode = {"mode": "sequential", "tolerance": args.tolerance}
    else:
        return {"mode": "fixed"}
    return {**mode, "bound": f"beta-binomial mixture confidence sequence, prior strength {CS_PRIOR_STRENGTH:g}"}


def _version() -> str:
    from . import __version__
    return __version__


def _indices(args, size: int, done: set) -> list:
    """Cohen's loop: every skip-th index, stopping at index --max; minus the rows already written."""
    stop = size if args.max < 0 else min(size, args.max)
    return [i for i in range(0, stop, args.skip) if i not in done]


def _progress(total: int, disable: bool):
    from tqdm import tqdm

    bar = tqdm(total=total, unit="img", file=sys.stderr, disable=disable, dynamic_ncols=True)
    start = time.perf_counter()

    def step(images: int, copies: int):
        """``images`` done and ``copies`` drawn in all (every process's, under torchrun)."""
        bar.update(max(0, images - bar.n))
        elapsed = max(time.perf_counter() - start, 1e-9)
        bar.set_postfix_str(f"{copies / elapsed:,.0f} copies/s", refresh=False)

    return bar, step


def _results(args, smooth, items):
    """Certificates (or predictions) for (index, x) items, in the order the items come."""
    if args.command == "certify":
        return smooth.certify_many(items, n0=args.n0, n=args.n, alpha=args.alpha, batch_size=args.batch,
                                   norm=args.norm, radii=args.radii, sequential=args.sequential,
                                   tolerance=args.tolerance)
    return smooth.predict_many(items, n=args.n, alpha=args.alpha, batch_size=args.batch)


def _row(args, r, label: int) -> dict:
    from .results import format_probability, format_radius, format_time

    row = {"idx": r.image_index, "label": label, "predict": r.prediction,
           "correct": int(r.prediction == label), "time": format_time(r.seconds, args.cohen)}
    if args.command == "certify":
        row.update(radius=format_radius(r.radius, args.cohen), p_lower=format_probability(r.p_lower),
                   n_a=r.n_a, n=r.n, norm=r.norm)
    return row


def _columns(args):
    from .results import CERTIFY_COLUMNS, PREDICT_COLUMNS
    return CERTIFY_COLUMNS if args.command == "certify" else PREDICT_COLUMNS


def _items(dataset, pending, labels, claim):
    """(index, x) for the pending images, each taken by ``claim()`` -> position in ``pending``."""
    while (k := claim()) < len(pending):
        index = pending[k]
        x, label = dataset[index]
        labels[index] = int(label)
        yield index, x


def _copies(r) -> int:
    """The noisy copies (model forwards) behind a result: selection and estimation."""
    return r.n0 + r.n if hasattr(r, "n0") else r.n


def run_sampling(args, ctx=None) -> int:
    """certify / predict: one process, or one of the processes of a torchrun job (ctx). One loop for
    both; what differs (the device, who plans, where rows go) is the process's part."""
    _resolve(args)
    process = _Alone(args) if ctx is None else _Rank(args, ctx)
    with process:
        device = process.start()
        smooth, dataset, meta = _setup(args, device, show_progress=process.is_main, **process.setup_options())
        columns = _columns(args)
        pending = process.plan(meta, columns, len(dataset))
        labels: dict = {}
        bar, step = _progress(len(pending), args.no_progress or not process.is_main)
        with bar:
            for r in _results(args, smooth, _items(dataset, pending, labels, process.claim)):
                step(*process.write(_row(args, r, labels.pop(r.image_index)), _copies(r)))
        process.finish()
    if smooth.sampler.compile and process.is_main:
        why = "" if args.compile == "on" else "; --compile off skips it"
        print(f"fastsmooth: torch.compile cost {smooth.sampler.compile_seconds:.1f} s (once, before the first "
              f"image{why})", file=sys.stderr)
    return 0


class _Alone:
    """A run in one process: OUT (or standard output) written directly; --resume folds in the rows
    of an interrupted run (OUT and the parts of a run of many processes)."""

    is_main = True

    def __init__(self, args):
        self.args, self.writer, self.resumed = args, None, False
        self.meta, self.columns = None, None
        self.images = self.copies = 0
        self._next = 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.writer is not None:
            self.writer.close()

    def start(self) -> torch.device:
        device = _device(self.args, None)
        _preflight_out(self.args)
        return device

    def setup_options(self) -> dict:
        """A resumed run takes the engine's "auto" choices recorded with OUT."""
        args = self.args
        return {"recorded": _recorded_choices(args.out) if args.resume and args.out is not None else None}

    def plan(self, meta: dict, columns, size: int) -> list:
        from .results import consolidate, existing_outputs

        self.meta, self.columns = meta, columns
        meta["started"] = datetime.datetime.now().isoformat(timespec="seconds")
        self.resumed = self.args.resume and bool(existing_outputs(self.args.out))
        done = consolidate(self.args.out, columns, meta) if self.resumed else set()
        return _indices(self.args, size, done)

    def claim(self) -> int:
        self._next += 1
        return self._next - 1

    def _open(self):
        # Created at the first row (or at the end, header only): a run that fails before its
        # first image leaves no file behind, and an existing one untouched.
        from .results import ResultWriter, find_parts

        if not self.resumed and self.args.out is not None:
            for path in find_parts(self.args.out):  # --force: parts of an earlier run
                os.remove(path)
        return ResultWriter(self.args.out, self.columns, metadata=self.meta, resume=self.resumed,
                            force=self.args.force)

    def write(self, row: dict, copies: int):
        self.writer = self.writer or self._open()
        self.writer.write(row)
        self.images, self.copies = self.images + 1, self.copies + copies
        return self.images, self.copies

    def finish(self) -> None:
        from .results import sort_rows

        self.writer = self.writer or self._open()
        self.writer.close()
        self.writer = None
        if self.resumed:
            sort_rows(self.args.out, self.columns)  # rows resumed before earlier gaps were appended at the end


class _Rank:
    """One process of a torchrun job (see fastsmooth/distributed.py for the protocol): rank 0 plans
    and merges; every process takes images from the shared list and writes its own part file."""

    def __init__(self, args, ctx):
        if args.out is None:
            raise CliError(f"a run of {ctx.world_size} processes needs --out (each writes OUT.rankK.part)")
        self.args, self.ctx, self.is_main = args, ctx, ctx.is_main
        self.part, self.written, self.meta, self.columns, self.device = None, 0, None, None, None

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        try:
            if self.part is not None:
                self.part.close()
            if exc is not None and not isinstance(exc, PeerFailed):
                self.ctx.fail(first_line(exc) if not isinstance(exc, KeyboardInterrupt) else "interrupted")
        finally:
            self.ctx.close()

    def start(self) -> torch.device:
        self.device = device = _device(self.args, self.ctx)
        self.ctx.init(device)
        if self.is_main:
            _preflight_out(self.args)
            self.ctx.publish("preflight", True)
        else:
            self.ctx.wait_for("preflight")
        return device

    def setup_options(self) -> dict:
        """Rank 0 resolves the engine's "auto" choices (from the recorded run when resuming) and the
        others take them: every process then runs the same base classifier."""
        ctx, args = self.ctx, self.args
        if ctx.is_main:
            return {"recorded": _recorded_choices(args.out) if args.resume else None, "share": ctx.world_size,
                    "on_choices": lambda choices: ctx.publish("engine", choices)}
        return {"recorded": lambda: ctx.wait_for("engine"), "share": ctx.world_size}

    def plan(self, meta: dict, columns, size: int) -> list:
        from .results import META_SUFFIX, consolidate, existing_outputs

        self.meta, self.columns = meta, columns
        meta["device"] = self.device.type  # cuda:LOCAL_RANK differs by process; a resume may use others
        if not self.is_main:
            plan = self.ctx.wait_for("plan")
            meta["started"] = plan["started"]
            return plan["pending"]
        meta["started"] = datetime.datetime.now().isoformat(timespec="seconds")
        if self.args.resume:
            done = consolidate(self.args.out, columns, meta)
        else:  # --force (or nothing there): start over
            done = set()
            for path in existing_outputs(self.args.out) + [self.args.out + META_SUFFIX]:
                if os.path.exists(path):
                    os.remove(path)
        pending = _indices(self.args, size, done)
        self.ctx.publish("plan", {"pending": pending, "started": meta["started"]})
        return pending

    def claim(self) -> int:
        return self.ctx.claim()

    def write(self, row: dict, copies: int):
        from .results import META_SUFFIX, ResultWriter, part_path, write_metadata

        if self.part is None:
            # At the first row (a run that fails before any leaves nothing behind), with the
            # settings beside it for a later --resume (the same in every process).
            if not os.path.exists(self.args.out + META_SUFFIX):
                write_metadata(self.args.out, self.meta)
            self.part = ResultWriter(part_path(self.args.out, self.ctx.rank), self.columns, force=True)
        self.part.write(row)
        self.written += 1
        return self.ctx.count_row(copies)

    def finish(self) -> None:
        from .distributed import merge_parts
        from .results import write_metadata

        if self.part is not None:
            self.part.close()
            self.part = None
        self.ctx.finish(self.written)
        if self.is_main:
            counts = self.ctx.wait_all_finished()
            merge_parts(self.args.out, self.columns, counts)
            write_metadata(self.args.out, self.meta)
            shares = ", ".join(f"rank {r}: {c}" for r, c in sorted(counts.items()))
            print(f"fastsmooth {self.args.command}: {sum(counts.values())} new rows from {self.ctx.world_size} "
                  f"processes ({shares}) merged into {self.args.out}", file=sys.stderr)


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    tune_cpu_allocator()  # CPU forwards stop paying page faults for every batch (allocator.py)
    sampling = args.command in ("certify", "predict")
    ctx = None
    try:
        if sampling:
            from .distributed import Context

            ctx = Context.from_env()
            return run_sampling(args, ctx)
        return args.run(args)
    except KeyboardInterrupt:
        print("fastsmooth: interrupted", file=sys.stderr)
        return 130
    except PeerFailed as exc:  # another process failed and said why; rank 0 repeats it once
        if args.debug:
            raise
        if ctx is None or ctx.is_main:
            print(f"fastsmooth {args.command}: error: {first_line(exc)}", file=sys.stderr)
        return 2
    except (CliError, ModelError, *LOCAL_ERRORS, _nonfinite_error()) as exc:
        if args.debug:
            raise
        where = f"rank {ctx.rank}: " if ctx is not None and not ctx.is_main else ""
        print(f"fastsmooth {args.command}: error: {where}{first_line(exc)}", file=sys.stderr)
        return 2
    except Exception as exc:
        if args.debug or not sampling:
            raise
        print(f"fastsmooth {args.command}: internal error: {type(exc).__name__}: {first_line(exc)} "
              "(rerun with --debug for the traceback)", file=sys.stderr)
        return 1


def _nonfinite_error():
    from .sampler import NonFiniteLogitsError
    return NonFiniteLogitsError


if __name__ == "__main__":
    sys.exit(main())
