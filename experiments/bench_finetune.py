"""Benchmark 1: one fine-tune epoch of a CIFAR ResNet on CIFAR-10 (JPEG), icep's loop against a
plain loop as the ICE reference code runs it, side by side in one process.

    # the measurement (a GPU machine; see experiments/device/ for carrying the archive there)
    python experiments/bench_finetune.py --data ../shared/data/cifar10-jpeg.tar.gz --out DIR
    # a toy run on the CPU
    python experiments/bench_finetune.py --device cpu --depth 20 --train-subset 2000 \\
        --variants plain,icep,icep_fp32,icep_workers

Variants (``--variants``, comma-separated):

- ``plain``: the reference loop. torchvision's CIFAR10 holds uint8 arrays in memory and makes a PIL
  image per sample; here the JPEGs are decoded into memory once and served the same way
  (Image.fromarray, RandomCrop(32, padding=4), RandomHorizontalFlip, ToTensor, Normalize) by a
  DataLoader with batch 128, ``num_workers=0``; fp32, ``cudnn.deterministic=True``,
  ``cudnn.benchmark=False``, ``torch.optim.SGD``, ``.to(device)`` and ``loss.item()`` per batch.
- ``icep``: icep's loop as a run uses it on this device: data held on the device
  (``trainer.loader=device``), bf16 autocast, channels_last, cuDNN benchmark and the fused SGD on
  CUDA (``trainer.*=auto``).
- ``icep_fp32``: icep's data path and loop without autocast and channels_last.
- ``icep_workers``: icep's loop with the DataLoader path (``trainer.loader=workers``).
- ``icep_compile``: ``icep`` with ``trainer.compile=true``; its first epoch (compilation included,
  as after every prune) is reported separately from the steady epochs.

Each variant trains a fresh copy of the same initial model, first ``--warmup-batches`` batches
(cuDNN autotuning, lazy initialisation and allocation stay out of the numbers), then
``--epochs`` timed epochs (device synchronised before and after). The GPU's limit: the epoch's
FLOPs (3 x 2 x forward MACs per image x images) over the dense matmul rate measured in the same
process (bf16 on CUDA, fp32 on the CPU).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VARIANTS = ("plain", "icep", "icep_fp32", "icep_workers", "icep_compile")
GOAL = 5.0  # icep over plain, images/s


class BenchError(Exception):
    """Bad input: printed as one line, exit code 2."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--data", type=Path, default=ROOT.parent / "shared/data/cifar10-jpeg.tar.gz"
    )
    parser.add_argument("--cache", type=Path, default=ROOT / "outputs/cache/datasets")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--depth", type=int, default=56, help="CIFAR ResNet depth (6n+2)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--train-subset", type=int, default=None, help="train+val samples (toy)")
    parser.add_argument("--epochs", type=int, default=1, help="timed epochs per variant")
    parser.add_argument("--warmup-batches", type=int, default=20)
    parser.add_argument("--workers", type=int, default=4, help="icep_workers' DataLoader workers")
    parser.add_argument("--variants", default="plain,icep,icep_fp32,icep_workers,icep_compile")
    parser.add_argument("--out", type=Path, default=None, help="folder for bench_finetune.md/.json")
    args = parser.parse_args(argv)
    args.variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown or not args.variants:
        parser.error(
            f"unknown variant {unknown[0] if unknown else '(none)'!r}; "
            f"choose from {', '.join(VARIANTS)}"
        )
    if (args.depth - 2) % 6 or args.depth < 8:
        parser.error(f"--depth {args.depth}: a CIFAR ResNet's depth is 6n+2 (20, 56, 110)")
    if args.epochs < 1 or args.batch_size < 1 or args.warmup_batches < 0:
        parser.error("--epochs and --batch-size must be at least 1, --warmup-batches at least 0")
    return args


def progress(message: str) -> None:
    print(f"[bench_finetune] {message}", flush=True)


# --- data -----------------------------------------------------------------------------------------


def dataset_cfg(args: argparse.Namespace):
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(ROOT / "conf/dataset/cifar10.yaml")
    cfg.root = str(args.data.resolve())
    cfg.train_subset = args.train_subset
    cfg.test_subset = 1000
    return cfg


def icep_data(args: argparse.Namespace, device, loader: str):
    from icep.data import build_data

    return build_data(
        dataset_cfg(args),
        seed=0,
        batch_size=args.batch_size,
        eval_batch_size=1024,
        num_workers=args.workers,
        cache_dir=args.cache,
        device=device,
        loader=loader,
    )


class ReferenceCifar:
    """torchvision's CIFAR10 as the reference reads it: uint8 HWC arrays in memory, a PIL image
    and the transforms per sample."""

    def __init__(self, images, labels, transform):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        from PIL import Image

        return self.transform(Image.fromarray(self.images[i])), int(self.labels[i])


def plain_loader(held_train, args: argparse.Namespace):
    """The reference's DataLoader over the same train samples icep trains on."""
    import torch
    from torchvision import transforms as T

    cfg = dataset_cfg(args)
    images = held_train.dataset.images.cpu().permute(0, 2, 3, 1).contiguous().numpy()
    transform = T.Compose(
        [
            T.RandomCrop(32, padding=4),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize(list(cfg.mean), list(cfg.std)),
        ]
    )
    dataset = ReferenceCifar(images, held_train.dataset.labels.cpu().numpy(), transform)
    return torch.utils.data.DataLoader(
        dataset, batch_size=args.batch_size, shuffle=True, num_workers=0
    )


# --- loops ----------------------------------------------------------------------------------------


def plain_epoch(model, loader, optimizer, device, limit: int | None = None) -> int:
    """The reference's loop: fp32, a copy to the device and ``loss.item()`` per batch."""
    import torch.nn.functional as F

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
        _ = loss.item()
        images += len(y)
    return images


@contextlib.contextmanager
def cudnn_flags(deterministic: bool, benchmark: bool):
    import torch

    saved = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = deterministic, benchmark
    try:
        yield
    finally:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved


def synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device, fn) -> tuple[float, object]:
    synchronize(device)
    start = time.perf_counter()
    result = fn()
    synchronize(device)
    return time.perf_counter() - start, result


class Limited:
    """The first ``n`` batches of a loader (the warm-up)."""

    def __init__(self, loader, n: int):
        self.loader, self.n = loader, n

    def __iter__(self):
        for i, batch in enumerate(self.loader):
            if i >= self.n:
                return
            yield batch

    def __len__(self) -> int:
        return min(self.n, len(self.loader))


def run_variant(name: str, args, device, initial, held, macs: int, rate: float) -> dict:
    import copy

    import torch

    from icep.train import Trainer, sgd

    cuda = device.type == "cuda"
    model = copy.deepcopy(initial).to(device)
    row: dict = {"variant": name}
    if name == "plain":
        loader = plain_loader(held.train, args)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
        with cudnn_flags(deterministic=True, benchmark=False):
            progress(f"{name}: warm-up, {args.warmup_batches} batches")
            plain_epoch(model, loader, optimizer, device, limit=args.warmup_batches)
            seconds = images = 0.0
            for epoch in range(args.epochs):
                progress(f"{name}: epoch {epoch + 1}/{args.epochs}")
                s, n = timed(device, lambda: plain_epoch(model, loader, optimizer, device))
                seconds, images = seconds + s, images + n
    else:
        fast = name != "icep_fp32"
        data = icep_data(args, device, "workers" if name == "icep_workers" else "device")
        trainer = Trainer(
            device,
            amp=cuda and fast,
            channels_last=cuda and fast,
            cudnn_benchmark=cuda,
            compile=name == "icep_compile",
        )
        model = trainer.prepare(model)
        optimizer = sgd(model, 0.01, 0.9, 5e-4)
        with cudnn_flags(deterministic=False, benchmark=cuda):
            if name == "icep_compile":
                progress(f"{name}: first epoch, compilation included")
                first, _ = timed(device, lambda: trainer.train_epoch(model, data.train, optimizer))
                row["first_epoch_s"] = first
            progress(f"{name}: warm-up, {args.warmup_batches} batches")
            warm = Limited(data.train, args.warmup_batches)
            trainer.train_epoch(model, warm, optimizer)
            seconds = 0.0
            for epoch in range(args.epochs):
                progress(f"{name}: epoch {epoch + 1}/{args.epochs}")
                s, _ = timed(device, lambda: trainer.train_epoch(model, data.train, optimizer))
                seconds += s
            images = len(data.train.dataset) * args.epochs
    flops = 6 * macs * images
    row.update(
        images=int(images),
        seconds=seconds,
        epoch_s=seconds / args.epochs,
        images_per_s=images / seconds,
        tflops=flops / seconds / 1e12,
        share_of_matmul=flops / seconds / rate,
        floor_s=flops / args.epochs / rate,
    )
    if "first_epoch_s" in row:
        row["compile_s"] = row["first_epoch_s"] - row["epoch_s"]
    progress(f"{name}: {row['images_per_s']:.0f} images/s, {row['epoch_s']:.2f} s per epoch")
    return row


def matmul_rate(device) -> tuple[float, str]:
    """FLOP/s of a large dense matrix product on random data: bf16 on CUDA, fp32 on the CPU."""
    import torch

    n, dtype = (8192, torch.bfloat16) if device.type == "cuda" else (1024, torch.float32)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(10):
        s, _ = timed(device, lambda: a @ b)
        times.append(s)
    times.sort()
    return 2 * n**3 / times[len(times) // 2], f"{n}x{n}x{n} {str(dtype).split('.')[-1]}"


# --- report ---------------------------------------------------------------------------------------


def markdown(rows: list[dict], head: dict) -> str:
    lines = [
        f"# Fine-tune epoch: icep vs the reference loop ({head['model']}, CIFAR-10 JPEG)",
        "",
        f"- device: {head['device_name']}; torch {head['torch']}, torchvision "
        f"{head['torchvision']}, cuDNN {head['cudnn']}; {head['date']}",
        f"- command: `{head['command']}`",
        f"- {head['train_images']} train images per epoch, batch {head['batch_size']}, "
        f"{head['epochs']} timed epoch(s) after {head['warmup_batches']} warm-up batches; "
        f"forward {head['macs'] / 1e6:.1f} MMACs per image",
        f"- measured matmul rate ({head['matmul']}): {head['matmul_tflops']:.1f} TFLOP/s",
        "",
        "| variant | images/s | epoch (s) | vs plain | TFLOP/s | % of matmul rate | floor (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ratio = f"{r['vs_plain']:.2f}x" if "vs_plain" in r else ""
        lines.append(
            f"| {r['variant']} | {r['images_per_s']:,.0f} | {r['epoch_s']:.2f} | {ratio} | "
            f"{r['tflops']:.2f} | {100 * r['share_of_matmul']:.1f} | {r['floor_s']:.3f} |"
        )
    compiled = next((r for r in rows if "compile_s" in r), None)
    if compiled is not None:
        plain_icep = next((r for r in rows if r["variant"] == "icep"), None)
        pays = plain_icep is not None and compiled["first_epoch_s"] < plain_icep["epoch_s"]
        lines += [
            "",
            f"torch.compile: first epoch {compiled['first_epoch_s']:.1f} s (compilation "
            f"{compiled['compile_s']:.1f} s), then {compiled['epoch_s']:.2f} s per epoch. "
            f"After each prune the shapes change and it compiles again: for a one-epoch "
            f"fine-tune it {'pays' if pays else 'does not pay'}"
            + (f" (icep without it: {plain_icep['epoch_s']:.2f} s)." if plain_icep else "."),
        ]
    if head.get("goal"):
        lines += ["", head["goal"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return measure(args)
    except BenchError as err:
        print(f"bench_finetune: {err}", file=sys.stderr)
        return 2


def measure(args: argparse.Namespace) -> int:
    import torch
    import torchvision

    from icep.errors import IcepError
    from icep.models import cifar_resnet
    from icep.pruning import count_macs_params
    from icep.train import resolve_device

    if not args.data.exists():
        raise BenchError(
            f"no CIFAR-10 archive at {args.data}; pass --data PATH (cifar10-jpeg.tar.gz)"
        )
    try:
        device = resolve_device(args.device)
        progress(f"data: {args.data} on {device}")
        held = icep_data(args, device, "device")
    except IcepError as err:
        raise BenchError(str(err).replace("trainer.device", "--device")) from None
    torch.manual_seed(0)
    initial = cifar_resnet(depth=args.depth, num_classes=held.num_classes)
    macs, _ = count_macs_params(initial, torch.zeros(1, *held.input_shape))
    rate, matmul = matmul_rate(device)
    progress(f"matmul rate ({matmul}): {rate / 1e12:.1f} TFLOP/s")

    rows = []
    for variant in args.variants:
        rows.append(run_variant(variant, args, device, initial, held, macs, rate))
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the variant's model and data are gone: start clean
    plain = next((r for r in rows if r["variant"] == "plain"), None)
    goal = None
    if plain is not None:
        for r in rows:
            r["vs_plain"] = r["images_per_s"] / plain["images_per_s"]
        icep = next((r for r in rows if r["variant"] == "icep"), None)
        if icep is not None:
            goal = (
                f"icep / plain = {icep['vs_plain']:.2f}x (goal >= {GOAL:g}x): "
                f"{'met' if icep['vs_plain'] >= GOAL else 'not met'}"
            )
    head = {
        "model": f"ResNet-{args.depth}",
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU",
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "cudnn": torch.backends.cudnn.version(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": " ".join(["python", *sys.argv]),
        "train_images": len(held.train.dataset),
        "batch_size": args.batch_size,
        "epochs": args.epochs,
        "warmup_batches": args.warmup_batches,
        "macs": macs,
        "matmul": matmul,
        "matmul_tflops": rate / 1e12,
        "goal": goal,
    }
    text = markdown(rows, head)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "bench_finetune.md").write_text(text)
        (args.out / "bench_finetune.json").write_text(json.dumps({**head, "rows": rows}, indent=1))
    print(text, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
