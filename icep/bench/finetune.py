"""Benchmark 1 of issue 8: one fine-tune epoch of a CIFAR ResNet on CIFAR-10 (the JPEG archive),
icep's loop against a plain loop as the ICE reference code runs it, side by side in one process.

    # the measurement, on a GPU machine (experiments/device/ carries the archive and the wheels)
    icep bench finetune --data ../shared/data/cifar10-jpeg.tar.gz --out DIR
    # a toy run on the CPU
    icep bench finetune --device cpu --model resnet20 --train-subset 2000 \\
        --variants plain,icep,icep_fp32,icep_workers

Variants (``--variants``, comma-separated, measured in the order given):

- ``plain``: the reference loop. torchvision's CIFAR10 holds the uint8 images in memory and makes
  a PIL image per sample; here the JPEGs are decoded into memory once (decoding is not charged to
  it) and served the same way: Image.fromarray, RandomCrop(32, padding=4), RandomHorizontalFlip,
  ToTensor, Normalize, in a DataLoader with ``shuffle=True, num_workers=0``. fp32,
  ``cudnn.deterministic=True``, ``cudnn.benchmark=False``, ``torch.optim.SGD`` (not fused),
  ``.to(device)`` and ``loss.item()`` per batch.
- ``icep``: icep's loop as a run sets it up on this device (``trainer.*=auto``): the data held on
  the device (``trainer.batching=device``), batches cropped, flipped and normalized there; on CUDA
  bf16 autocast, channels_last, cuDNN benchmark and the fused SGD.
- ``icep_fp32``: ``icep`` without autocast and channels_last (the device data path stays).
- ``icep_workers``: ``icep`` with DataLoader workers (``trainer.batching=workers``, ``--workers``)
  reading the decoded-on-the-fly JPEGs instead of the data held on the device.
- ``icep_compile``: ``icep`` with ``trainer.compile=true``. Its first epoch (compilation included,
  as after every prune, since the shapes change) is reported apart from the steady epochs.

Every variant trains a fresh copy of the same seeded model with SGD (lr 0.001, momentum 0.9,
weight decay 1e-4, the reference's fine-tune settings) on the same train images. Its first epoch
is the warm-up (lazy initialisation, cuDNN autotuning, compilation): timed and reported as "first
epoch", left out of images/s; ``--warmup-batches N`` makes the warm-up N untimed batches instead
(quick toy runs; ``icep_compile`` still times its whole first epoch). Then ``--epochs`` epochs are
timed, the device synchronised before and after each.

The GPU's limit: one training epoch takes 3 x 2 x (forward MACs per image) x images FLOPs, as
icep's compute accounting counts them (icep.compute: conv and linear MACs);
the dense matmul rate is measured in the same process (8192^3 bf16 on CUDA, tf32 beside it for the
fp32 loop; 1024^3 fp32 on the CPU). Each variant's achieved FLOP/s is given as a share of it, and
the epoch's FLOPs over it are the time floor.

Bad input (unknown variant or model, missing archive, CUDA asked for but absent) is one line on
stderr and exit code 2; a variant that fails while measuring (say torch.compile without a
compiler) is a row saying so, the others are still measured, and the exit code is 1. The run
stops itself at ``--time-limit`` seconds (default 480, inside a device call's 10 minutes): the
variant then running is stopped, later ones skipped, the table printed; ``--out`` gets the JSON
after every variant. ``--threads 1`` keeps CPU timings steady on a machine shared with other work.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import gc
import json
import logging
import os
import platform
import re
import shlex
import signal
import sys
import time
from importlib.resources import files
from pathlib import Path

from icep.config import user_cache

VARIANTS = ("plain", "icep", "icep_fp32", "icep_workers", "icep_compile")
GOAL = 5.0  # icep over plain, images/s
LR, MOMENTUM, WEIGHT_DECAY = 0.001, 0.9, 1e-4  # the reference's fine-tune SGD (METHOD.md, 2)
SEED = 0
STARTED = time.perf_counter()  # --time-limit counts from here


class BenchError(Exception):
    """Bad input: printed as one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's own errors: one line too, no usage block
        raise BenchError(f"{message}; see --help")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = _Parser(
        prog="icep bench finetune",
        description="One fine-tune epoch: icep's loop against the reference loop.",
    )
    parser.add_argument(
        "--data",
        type=Path,
        default=Path("../shared/data/cifar10-jpeg.tar.gz"),
        help="the CIFAR-10 JPEG archive, or a folder of train/ and test/ trees (default: the "
        "archive beside a checkout, run from the checkout)",
    )
    parser.add_argument(
        "--cache",
        type=Path,
        default=user_cache() / "datasets",
        help="where the archive is unpacked and the decoded pixels kept (once)",
    )
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--model", default="resnet56", help="resnetN, N = 6n+2 (20, 56, 110)")
    parser.add_argument("--depth", type=int, default=None, help="N: the same as --model resnetN")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument(
        "--train-subset", type=int, default=None, help="train+val images (toy runs); 10%% is val"
    )
    parser.add_argument("--epochs", type=int, default=1, help="timed epochs per variant")
    parser.add_argument(
        "--warmup-batches",
        type=int,
        default=0,
        help="0: the first epoch is the warm-up (timed apart); N: N untimed batches",
    )
    parser.add_argument("--workers", type=int, default=4, help="icep_workers' DataLoader workers")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=", ".join(VARIANTS))
    parser.add_argument(
        "--out", type=Path, default=None, help="folder for bench_finetune.md and .json"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch's CPU threads (torch.set_num_threads); default torch's own. On a CPU shared "
        "with other work, 1 keeps the timings steady",
    )
    parser.add_argument(
        "--time-limit",
        type=float,
        default=480,
        help="seconds for the whole run: a variant still running then is stopped, later ones "
        "skipped, and the table printed (a device call may run 10 minutes)",
    )
    args = parser.parse_args(argv)

    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not variants:
        got = f"unknown variant {unknown[0]!r}" if unknown else "no variant given"
        raise BenchError(f"--variants: {got}; choose from {', '.join(VARIANTS)}")
    args.variants = list(dict.fromkeys(variants))
    got = f"--model: got {args.model!r}"
    if args.depth is not None:
        args.model, got = f"resnet{args.depth}", f"--depth: got {args.depth}"
    match = re.fullmatch(r"resnet(\d+)", args.model.lower())
    args.depth = int(match.group(1)) if match else 0
    if args.depth < 8 or (args.depth - 2) % 6:
        raise BenchError(
            f"{got}; expected a CIFAR ResNet resnetN with N = 6n+2, "
            "e.g. resnet20, resnet56, resnet110"
        )
    for option, value, least in (
        ("--epochs", args.epochs, 1),
        ("--batch-size", args.batch_size, 1),
        ("--warmup-batches", args.warmup_batches, 0),
        ("--workers", args.workers, 0),
        ("--time-limit", args.time_limit, 1),
        ("--threads", 1 if args.threads is None else args.threads, 1),
    ):
        if value < least:
            raise BenchError(f"{option}: got {value}; expected at least {least}")
    if args.train_subset is not None and args.train_subset < 20:
        raise BenchError(f"--train-subset: got {args.train_subset}; expected at least 20 images")
    if not args.data.exists():
        raise BenchError(
            f"--data: no CIFAR-10 archive at {args.data}; pass --data PATH to "
            "cifar10-jpeg.tar.gz (the JPEG archive, in ../shared/data beside the checkout)"
        )
    return args


def progress(message: str) -> None:
    print(f"[bench_finetune] {message}", flush=True)


# --- data -----------------------------------------------------------------------------------------


def dataset_cfg(args: argparse.Namespace):
    """The ``dataset`` node as ``+dataset=cifar10`` composes it, on ``--data``."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.create((files("icep.conf") / "dataset" / "cifar10.yaml").read_text())
    cfg.root = str(args.data.resolve())
    cfg.train_subset = args.train_subset
    cfg.test_subset = 100  # the test split is not used; keep its loading short
    return cfg


def icep_data(args: argparse.Namespace, device, batching: str):
    from icep.data import build_data

    return build_data(
        dataset_cfg(args),
        seed=SEED,
        batch_size=args.batch_size,
        eval_batch_size=1024,
        num_workers=args.workers,
        cache_dir=args.cache,
        device=device,
        batching=batching,
    )


class ReferenceCifar:
    """torchvision's CIFAR10 as the reference reads it: uint8 HWC arrays in memory, then a PIL
    image and the transforms per sample."""

    def __init__(self, images, labels, transform):
        self.data, self.targets, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        from PIL import Image

        return self.transform(Image.fromarray(self.data[i])), int(self.targets[i])


def plain_loader(train_split, args: argparse.Namespace):
    """The reference's DataLoader over the same train images icep trains on (``train_split``: a
    TensorSplit on the CPU, uint8 NCHW)."""
    import torch
    from torchvision import transforms as T

    cfg = dataset_cfg(args)
    images = train_split.images.permute(0, 2, 3, 1).contiguous().numpy()
    transform = T.Compose(
        [
            T.RandomCrop(32, padding=4),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize(list(cfg.mean), list(cfg.std)),
        ]
    )
    dataset = ReferenceCifar(images, train_split.labels.numpy(), transform)
    return torch.utils.data.DataLoader(
        dataset, batch_size=args.batch_size, shuffle=True, num_workers=0
    )


# --- timing ---------------------------------------------------------------------------------------


@contextlib.contextmanager
def cudnn_flags(deterministic: bool, benchmark: bool):
    """cuDNN's flags for one variant; the previous ones afterwards."""
    import torch

    saved = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = deterministic, benchmark
    try:
        yield
    finally:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved


def timed(device, fn):
    """(seconds, fn()), timed by icep's PhaseTimer: the device synchronised before and after."""
    from icep.train import PhaseTimer

    with PhaseTimer(device).phase("bench") as t:
        result = fn()
    return t["seconds"], result


class OutOfTime(Exception):
    """Raised in the main thread when ``--time-limit`` runs out."""


@contextlib.contextmanager
def deadline(seconds: float):
    """Raise :class:`OutOfTime` in the block after ``seconds`` (where SIGALRM exists); yields a
    function telling whether it fired (an error raised by it may reach us wrapped)."""
    fired = [False]
    if not hasattr(signal, "SIGALRM"):
        yield lambda: fired[0]
        return

    def expire(signum, frame):
        fired[0] = True
        raise OutOfTime(f"--time-limit reached after {seconds:.0f} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.001))
    try:
        yield lambda: fired[0]
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


class Limited:
    """The first ``n`` batches of a loader (the warm-up)."""

    def __init__(self, loader, n: int):
        self.loader, self.n = loader, n
        self.batch_size = loader.batch_size

    def __iter__(self):
        for i, batch in enumerate(self.loader):
            if i >= self.n:
                return
            yield batch

    def __len__(self) -> int:
        return min(self.n, len(self.loader))


def epochs(name: str, args, device, run_epoch, cold: str, whole_first: bool = False) -> dict:
    """The warm-up, then ``args.epochs`` timed epochs of ``run_epoch(limit)`` (which trains
    ``limit`` batches, all when None, and returns the number of images). ``cold``: what the
    first epoch has to do once; ``whole_first``: time a whole first epoch whatever the warm-up."""
    row: dict = {}
    if args.warmup_batches == 0 or whole_first:
        progress(f"{name}: first epoch ({cold}; timed apart)")
        row["first_epoch_s"], _ = timed(device, lambda: run_epoch(None))
        progress(f"{name}: first epoch {row['first_epoch_s']:.2f} s")
    if args.warmup_batches > 0:
        progress(f"{name}: warm-up, {args.warmup_batches} batches (untimed)")
        run_epoch(args.warmup_batches)
    seconds, images = 0.0, 0
    for epoch in range(1, args.epochs + 1):
        progress(f"{name}: epoch {epoch}/{args.epochs} (timed)")
        s, n = timed(device, lambda: run_epoch(None))
        seconds, images = seconds + s, images + n
    row.update(images=images, seconds=seconds, epoch_s=seconds / args.epochs)
    row["images_per_s"] = images / seconds
    return row


# --- variants -------------------------------------------------------------------------------------


def run_plain(args, device, model, reference_train) -> dict:
    """The reference loop: fp32, a copy to the device and ``loss.item()`` per batch."""
    import torch
    import torch.nn.functional as F

    loader = plain_loader(reference_train, args)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY
    )

    def run_epoch(limit: int | None) -> int:
        model.train()
        images = 0
        for i, (x, y) in enumerate(loader):
            if limit is not None and i >= limit:
                break
            x, y = x.to(device), y.to(device)
            optimizer.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()
            loss.item()  # the running loss the reference prints
            images += len(y)
        return images

    with cudnn_flags(deterministic=True, benchmark=False):
        row = epochs("plain", args, device, run_epoch, "lazy init")
    row["setup"] = (
        f"{_fp32(device)}, torchvision DataLoader (PIL per image, num_workers=0), "
        "deterministic cuDNN, torch.optim.SGD"
    )
    return row


def run_icep(name: str, args, device, model) -> dict:
    """icep's Trainer and sgd on icep's loaders, set as ``name`` says."""
    from icep.train import Trainer, sgd

    cuda = device.type == "cuda"
    workers = name == "icep_workers"
    fast = cuda and name != "icep_fp32"
    progress(f"{name}: data ({'workers' if workers else 'device'} loader)")
    data = icep_data(args, device, "workers" if workers else "device")
    with cudnn_flags(deterministic=False, benchmark=cuda):
        # Made inside the flags: Trainer turns cuDNN benchmark on for the whole process.
        trainer = Trainer(
            device,
            amp=fast,
            channels_last=fast,
            cudnn_benchmark=cuda,
            compile=name == "icep_compile",
        )
        model = trainer.prepare(model)
        optimizer = sgd(model, LR, MOMENTUM, WEIGHT_DECAY)
        n_train = len(data.train.dataset)

        def run_epoch(limit: int | None) -> int:
            loader = data.train if limit is None else Limited(data.train, limit)
            trainer.train_epoch(model, loader, optimizer)
            return n_train if limit is None else min(limit * args.batch_size, n_train)

        cold = "lazy init" + (", cuDNN autotuning" if cuda else "")
        cold += ", compilation" if trainer.compile else ""
        row = epochs(name, args, device, run_epoch, cold, whole_first=trainer.compile)
        if workers:
            layout = "contiguous (NCHW), as the DataLoader collates them"
        else:
            layout = "channels_last" if _channels_last(next(iter(data.train))[0]) else "NCHW"
    loader = (
        f"DataLoader, {data.train.num_workers} workers"
        if workers
        else "data held on the device, batches augmented there"
    )
    fused = bool(optimizer.defaults.get("fused"))
    row["setup"] = (
        f"{'bf16 autocast' if trainer.amp else _fp32(device)}"
        f"{', channels_last' if trainer.channels_last else ''}, {loader}, "
        f"cuDNN benchmark {'on' if cuda else 'n/a'}, {'fused ' if fused else ''}SGD"
        f"{', torch.compile' if trainer.compile else ''}; batches come {layout}"
    )
    return row


def _fp32(device) -> str:
    import torch

    if device.type == "cuda" and torch.backends.cudnn.allow_tf32:
        return "fp32 (convolutions on TF32 tensor cores, cuDNN's default)"
    return "fp32"


def _channels_last(x) -> bool:
    import torch

    return x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and x.shape[1] > 1


def matmul_rates(device) -> dict[str, dict]:
    """FLOP/s of large dense matrix products on random data, median of 10 timed samples: bf16
    and tf32 on CUDA, fp32 on the CPU."""
    import torch

    def rate(n: int, dtype, reps: int) -> float:
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)

        def run():
            for _ in range(reps):
                a @ b

        run()
        run()
        times = sorted(timed(device, run)[0] for _ in range(10))
        return 2 * n**3 * reps / times[len(times) // 2]

    if device.type != "cuda":
        return {"fp32": {"shape": "1024^3 fp32", "flops": rate(1024, torch.float32, 1)}}
    rates = {"bf16": {"shape": "8192^3 bf16", "flops": rate(8192, torch.bfloat16, 5)}}
    saved = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")  # fp32 matmuls on TF32 tensor cores
    try:
        rates["tf32"] = {"shape": "8192^3 tf32", "flops": rate(8192, torch.float32, 5)}
    finally:
        torch.set_float32_matmul_precision(saved)
    return rates


def cpu_name() -> str:
    """The host's processor, e.g. '2-core Intel(R) Xeon(R) CPU @ 2.80GHz' (the plain loop's data
    path runs on it)."""
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"{os.cpu_count()}-core {model}"


# --- report ---------------------------------------------------------------------------------------


def summary(rows: list[dict], head: dict) -> list[str]:
    """The goal line, how far icep is from the limit, and whether compile pays."""
    by = {r["variant"]: r for r in rows if "error" not in r}
    plain, icep, compiled = by.get("plain"), by.get("icep"), by.get("icep_compile")
    lines = []
    if plain is not None and icep is not None:
        ratio = icep["vs_plain"]
        lines.append(
            f"icep / plain = {ratio:.2f}x (goal >= {GOAL:g}x): "
            f"{'met' if ratio >= GOAL else 'not met'}"
        )
    else:
        lines.append("icep / plain: not measured (needs both variants)")
    limit = head["limit"]
    for r in (icep, plain):
        if r is not None:
            lines.append(
                f"{r['variant']}: {r['tflops']:.3g} TFLOP/s, {100 * r['share_of_limit']:.1f}% of "
                f"the measured {limit['name']} matmul rate; its epoch takes {r['epoch_s']:.2f} s, "
                f"{r['epoch_s'] / head['floor_s']:.0f}x the floor of {head['floor_s']:.3f} s "
                f"(the epoch's FLOPs at that rate)"
            )
    if compiled is not None and icep is not None:
        ref_key = "first_epoch_s" if "first_epoch_s" in icep else "epoch_s"
        ref = icep[ref_key]
        pays = compiled["first_epoch_s"] < ref
        head["compile_pays_one_epoch"] = pays
        extra = compiled["first_epoch_extra_s"]
        line = (
            f"torch.compile: first epoch {compiled['first_epoch_s']:.2f} s (about {extra:.1f} s "
            f"of it compiling and autotuning), then {compiled['epoch_s']:.2f} s "
            f"per epoch, against icep's {'first' if ref_key == 'first_epoch_s' else 'steady'} "
            f"epoch of {ref:.2f} s without it. Every prune changes the shapes and compiles "
            f"again, so for a one-epoch fine-tune it {'pays' if pays else 'does not pay'}"
        )
        gain = icep["epoch_s"] - compiled["epoch_s"]
        if not pays and gain > 0:
            line += f"; it pays after about {extra / gain:.0f} epochs per shape"
        lines.append(line + ".")
    for r in rows:
        if "error" in r:
            lines.append(f"{r['variant']}: {r['error']}")
    return lines


def markdown(rows: list[dict], head: dict) -> str:
    limit = head["limit"]
    rates = "; ".join(
        f"{k} ({v['shape']}): {v['flops'] / 1e12:.3g} TFLOP/s" for k, v in head["matmul"].items()
    )
    warmup = (
        "the first epoch (timed apart: lazy init, cuDNN autotuning on CUDA, compilation for "
        "icep_compile)"
        if head["warmup_batches"] == 0
        else f"{head['warmup_batches']} untimed warm-up batches (icep_compile: its whole first "
        "epoch, timed apart)"
    )
    lines = [
        f"# One fine-tune epoch, {head['model']} on CIFAR-10 (JPEG): icep vs the reference loop",
        "",
        f"- device: {head['device_name']}; torch {head['torch']}, torchvision "
        f"{head['torchvision']}, cuDNN {head['cudnn']}; {head['date']}",
        f"- command: `{head['command']}`",
        f"- data: {head['data']}; {head['train_images']:,} train images per epoch (train split, "
        f"10% held out for validation), batch {head['batch_size']}",
        f"- model: {head['model']}, {head['params']:,} parameters, {head['macs'] / 1e6:.1f} "
        f"MMACs forward per image; one training epoch ~ 3 x 2 x MACs x images = "
        f"{head['epoch_flops'] / 1e12:.3g} TFLOP",
        f"- matmul rate measured here: {rates}; time floor of one epoch at the {limit['name']} "
        f"rate: {head['floor_s']:.3f} s",
        f"- timing: each variant trains a fresh copy of the same seeded model; excluded from "
        f"images/s: {warmup}; then {head['epochs']} timed epoch(s), the device synchronised "
        "before and after",
        "",
        f"| variant | images/s | epoch (s) | first epoch (s) | vs plain | TFLOP/s | "
        f"% of {limit['name']} matmul |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['variant']} | {r['error'].split()[0].rstrip(':')} | | | | | |")
            continue
        first = f"{r['first_epoch_s']:.2f}" if "first_epoch_s" in r else ""
        ratio = f"{r['vs_plain']:.2f}x" if "vs_plain" in r else ""
        lines.append(
            f"| {r['variant']} | {r['images_per_s']:,.0f} | {r['epoch_s']:.2f} | {first} | "
            f"{ratio} | {r['tflops']:.3g} | {100 * r['share_of_limit']:.1f} |"
        )
    lines.append("")
    lines += [f"- {r['variant']}: {r['setup']}" for r in rows if "setup" in r]
    lines += ["", *head["summary"]]
    return "\n".join(lines) + "\n"


def write(out: Path | None, rows: list[dict], head: dict, text: str | None = None) -> None:
    if out is None:
        return
    (out / "bench_finetune.json").write_text(json.dumps({**head, "rows": rows}, indent=1) + "\n")
    if text is not None:
        (out / "bench_finetune.md").write_text(text)


# --- main -----------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
        return measure(args, argv if argv is not None else sys.argv[1:])
    except BenchError as err:
        print(f"bench_finetune: {err}", file=sys.stderr, flush=True)
        return 2


def measure(args: argparse.Namespace, argv: list[str]) -> int:
    import torch

    from icep.errors import ConfigError, IcepError
    from icep.train import resolve_device

    try:
        device = resolve_device(args.device)
    except ConfigError as err:
        raise BenchError(f"--device: {err.message}") from None
    if args.out is not None:
        try:
            args.out.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise BenchError(f"--out: cannot make {args.out} ({err.strerror})") from None
    import torchvision

    from icep.compute import measure_cost
    from icep.models import cifar_resnet
    from icep.pruning import count_macs_params

    # icep's data lines (unpacking, decoding) as progress; once the input is known to be good.
    logging.basicConfig(level=logging.INFO, format="[icep] %(message)s", stream=sys.stdout)

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    name = torch.cuda.get_device_name(device) + ", host " if device.type == "cuda" else ""
    name += f"{cpu_name()}, torch threads: {torch.get_num_threads()}"
    progress(f"{name} ({device}); torch {torch.__version__}")
    progress(f"data: {args.data} (unpacked and decoded into {args.cache} on the first run)")
    try:
        held = icep_data(args, "cpu", "device")  # the train images, for the reference loop
    except IcepError as err:
        key = {"dataset.root": "--data", "dataset.train_subset": "--train-subset"}
        if isinstance(err, ConfigError) and err.key in key:
            raise BenchError(f"{key[err.key]}: {err.message}") from None
        raise BenchError(str(err)) from None
    reference_train = held.train.dataset
    torch.manual_seed(SEED)
    initial = cifar_resnet(depth=args.depth, num_classes=held.num_classes)
    _, params = count_macs_params(initial, torch.zeros(1, *held.input_shape))
    # icep's counting model (icep.compute): conv and linear MACs; a trained image costs 6 x MACs
    macs = measure_cost(initial, tuple(held.input_shape)).macs
    progress("matmul rate")
    rates = matmul_rates(device)
    limit_name = "bf16" if "bf16" in rates else "fp32"
    limit = rates[limit_name]["flops"]
    for v in rates.values():
        progress(f"matmul {v['shape']}: {v['flops'] / 1e12:.3g} TFLOP/s")
    n_train = len(reference_train)
    epoch_flops = 6 * macs * n_train
    head = {
        "model": f"ResNet-{args.depth}",
        "device": str(device),
        "device_name": name,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "cudnn": torch.backends.cudnn.version() if device.type == "cuda" else "n/a",
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": shlex.join(["icep", "bench", "finetune", *argv]),
        "data": str(args.data),
        "train_images": n_train,
        "batch_size": args.batch_size,
        "epochs": args.epochs,
        "warmup_batches": args.warmup_batches,
        "params": params,
        "macs": macs,
        "epoch_flops": epoch_flops,
        "matmul": rates,
        "limit": {"name": limit_name, "flops": limit},
        "floor_s": epoch_flops / limit,
        "goal": GOAL,
    }

    rows: list[dict] = []
    for variant in args.variants:
        left = args.time_limit - (time.perf_counter() - STARTED)
        if left < 1:
            rows.append(
                {"variant": variant, "error": f"skipped: --time-limit {args.time_limit:g} s"}
            )
            progress(f"{variant}: {rows[-1]['error']}")
            continue
        progress(f"--- {variant}")
        model = copy.deepcopy(initial).to(device)
        try:
            with deadline(left) as expired:
                if variant == "plain":
                    row = run_plain(args, device, model, reference_train)
                else:
                    row = run_icep(variant, args, device, model)
        except Exception as err:  # one failed variant leaves the others measured
            if expired():
                row = {"error": f"stopped at --time-limit {args.time_limit:g} s"}
            else:
                message = str(err).strip().splitlines()[0] if str(err).strip() else ""
                row = {"error": f"failed: {type(err).__name__}: {message}"[:300]}
            progress(f"{variant}: {row['error']}")
        del model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        row = {"variant": variant, **row}
        if "error" not in row:
            flops = 6 * macs * row["images"] / row["seconds"]
            row.update(tflops=flops / 1e12, share_of_limit=flops / limit)
            if "first_epoch_s" in row:
                row["first_epoch_extra_s"] = max(row["first_epoch_s"] - row["epoch_s"], 0.0)
            progress(f"{variant}: {row['images_per_s']:,.0f} images/s, {row['epoch_s']:.2f} s")
        rows.append(row)
        write(args.out, rows, head)  # what is measured so far survives a killed run

    plain = next((r for r in rows if r["variant"] == "plain" and "error" not in r), None)
    if plain is not None:
        for r in rows:
            if "error" not in r:
                r["vs_plain"] = r["images_per_s"] / plain["images_per_s"]
    head["summary"] = summary(rows, head)
    by = {r["variant"]: r for r in rows}
    if "vs_plain" in by.get("icep", {}):
        head["icep_over_plain"] = by["icep"]["vs_plain"]
        head["goal_met"] = by["icep"]["vs_plain"] >= GOAL
    text = markdown(rows, head)
    write(args.out, rows, head, text)
    print("", flush=True)
    print(text, end="", flush=True)
    if args.out is not None:
        progress(f"wrote {args.out / 'bench_finetune.md'} and bench_finetune.json")
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
