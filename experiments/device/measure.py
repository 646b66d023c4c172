"""The prepared GPU measurement (issue 14): one command, one device call, every figure written to
the output folder after each stage.

    # on the GPU machine, after `source experiments/device/setup.sh` (README here: the call)
    python3 experiments/device/measure.py --out "$OUT"                        # ResNet-56 plan
    python3 experiments/device/measure.py --plan resnet152-dense --out "$OUT" # its dense model
    python3 experiments/device/measure.py --plan resnet152 --out "$OUT"       # its comparison
    # here, on the CPU, at toy size, in about two minutes (a test runs it)
    python experiments/device/measure.py --toy --out /tmp/measure

Stages (``--stages`` picks and orders them; each plan has its own list):

- ``versions``: Python, torch, torchvision, CUDA, cuDNN, the GPU, icep's other packages, the date.
- ``tests``: the ``cuda``-marked tests (``pytest -m cuda``); skipped tests are counted as such.
- ``finetune``: ``experiments/bench_finetune.py``, one fine-tune epoch of icep's loop against
  the reference loop: images/s, the ratio (goal >= 5x), the share of the bf16 matmul rate.
- ``dense``: the plan's dense model with its fast recipe (``+experiment=<model>_cifar10_fast``),
  returned as ``checkpoints/<model>_cifar10_dense.pt`` with a JSON of its accuracy and recipe. A
  committed checkpoint (``experiments/checkpoints/``) makes the stage say so and skip.
- ``compare``: ICE (the paper's ResNet values) and the baseline iterative pipeline at r = 0.6
  from that dense model: test accuracy, time, counted compute, fine-tunes, ICE's speed-ups in time
  and compute, each pruned model's measured inference latency and speed-up (batch 1 and 256,
  CUDA events), and the goals (accuracy within 1 point; speed-up >= 4x on ResNet-56, >= 9.6x on
  ResNet-152).

Time: the command stops itself at ``--time-cap`` seconds (default 540, inside a device call's
10 minutes). A stage that no longer fits is skipped with the reason; a stage that runs out of time
is stopped, and what it leaves is returned so that the next call goes on from it
(``--resume-from`` the folder a previous call returned): a pruning run's checkpoint, a dense
training's last finished epoch. Results: ``OUT/measure.json`` and ``OUT/measure.md``, rewritten
after every stage. Exit code 0 when every stage ran to its end, 1 otherwise, 2 on bad input.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
STARTED = time.monotonic()

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
from icep.bench import compare  # noqa: E402

STAGES = ("versions", "tests", "finetune", "dense", "compare")
GOAL_FINETUNE = 5.0  # icep's loop over the reference loop, images/s
GOAL_ACC_POINTS = 1.0  # ICE's final test accuracy within this of the baseline's


# A plan: the model, its stages, the least time each needs to be worth starting, its goal.
PLANS = {
    "resnet56": {
        "model": "resnet56",
        "stages": ("versions", "tests", "finetune", "dense", "compare"),
        "goal_speedup": 4.0,
    },
    "resnet152-dense": {
        "model": "resnet152",
        "stages": ("versions", "dense"),
        "goal_speedup": None,
    },
    "resnet152": {"model": "resnet152", "stages": ("versions", "compare"), "goal_speedup": 9.6},
}
# Seconds a stage needs at least to be worth starting (on the GPU; --toy: on the CPU).
NEEDS = {"versions": 1, "tests": 30, "finetune": 60, "dense": 120, "compare": 150}
NEEDS_TOY = {"versions": 1, "tests": 5, "finetune": 10, "dense": 10, "compare": 20}
# The most a stage may take on the GPU, so those after it keep their share (--toy: only the
# --time-cap counts: on a busy CPU, unpacking the archive alone may take a minute).
CAPS = {"tests": 90, "finetune": 120, "dense": 210}
RESERVE_S = 15  # kept back for writing the results

# --toy: every stage at tiny size on the CPU (ResNet-8, 600 CIFAR-10 images).
TOY = [
    "trainer.device=cpu",
    "model.arch.depth=8",
    "dataset.train_subset=600",
    "dataset.test_subset=200",
    "trainer.batch_size=64",
    "trainer.eval_batch_size=200",
]
TOY_DENSE = ["dense.epochs=2", "dense.batch_size=128"]


class MeasureError(Exception):
    """Bad input: one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's own errors: one line too, no usage block
        raise MeasureError(f"{message}; see --help")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = _Parser(prog="measure.py", description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--out", type=Path, required=True, help="results folder ($OUT)")
    parser.add_argument("--plan", default="resnet56", help=", ".join(PLANS))
    parser.add_argument("--stages", default=None, help=f"comma-separated, from {', '.join(STAGES)}")
    parser.add_argument(
        "--data",
        type=Path,
        default=Path(
            os.environ.get("ICEP_ARCHIVE", ROOT.parent / "shared/data/cifar10-jpeg.tar.gz")
        ),
        help="the CIFAR-10 JPEG archive (default: $ICEP_ARCHIVE, else ../shared/data/...)",
    )
    parser.add_argument(
        "--checkpoint",
        type=Path,
        default=None,
        help="the dense model to prune (default: experiments/checkpoints/<model>_cifar10_dense.pt "
        "when committed, else the one the dense stage trains)",
    )
    parser.add_argument("--resume-from", type=Path, default=None, help="a previous call's $OUT")
    parser.add_argument("--time-cap", type=float, default=540.0, help="seconds for everything")
    parser.add_argument("--toy", action="store_true", help="tiny sizes on the CPU")
    parser.add_argument("--retrain-dense", action="store_true", help="even with a committed one")
    args = parser.parse_args(argv)
    if args.plan not in PLANS:
        raise MeasureError(f"--plan {args.plan!r}: choose one of {', '.join(PLANS)}")
    plan = PLANS[args.plan]
    args.stage_list = (
        [s.strip() for s in args.stages.split(",") if s.strip()] if args.stages else plan["stages"]
    )
    unknown = [s for s in args.stage_list if s not in STAGES]
    if unknown or not args.stage_list:
        raise MeasureError(f"--stages: unknown {unknown[:1] or 'none'}; choose from {STAGES}")
    if not args.data.exists():
        raise MeasureError(
            f"--data: no CIFAR-10 archive at {args.data}; pass --data PATH (prepare.sh copies it "
            "into .device/ for a device call)"
        )
    if args.resume_from is not None and not args.resume_from.is_dir():
        raise MeasureError(f"--resume-from: {args.resume_from} is not a folder")
    if args.checkpoint is not None and not args.checkpoint.is_file():
        raise MeasureError(f"--checkpoint: no file at {args.checkpoint}")
    args.model = plan["model"]
    args.goal_speedup = plan["goal_speedup"]
    return args


def left() -> float:
    return ARGS.time_cap - (time.monotonic() - STARTED)


def log(message: str) -> None:
    print(f"[measure {time.monotonic() - STARTED:6.1f}s] {message}", flush=True)


def run(cmd: list[str], timeout: float, log_path: Path) -> dict:
    """Run ``cmd`` from the checkout with a timeout; its output goes to ``log_path``. At the
    timeout its whole process group is killed: a test's or a benchmark's own children (icep runs,
    loader workers) must not go on using the GPU under the next stage."""
    start = time.monotonic()
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = proc.communicate(timeout=max(timeout, 1))
        code = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        code = None
    log_path.write_text(output)
    return {"returncode": code, "seconds": time.monotonic() - start, "output": output}


def tail(text: str, lines: int = 1) -> str:
    return " / ".join(line.strip() for line in text.strip().splitlines()[-lines:])


def icep_args() -> list[str]:
    return [f"dataset.root={ARGS.data.resolve()}", "logger=local", *(TOY if ARGS.toy else [])]


# --- stages -------------------------------------------------------------------------------------


def stage_versions() -> dict:
    import torch
    import torchvision

    versions = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "cpu": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
    }
    for name in ("hydra", "omegaconf", "optuna", "torch_pruning", "timm"):
        try:
            versions[name] = __import__(name).__version__
        except Exception:  # not installed: say so
            versions[name] = None
    try:
        versions["commit"] = (
            subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
            ).stdout.strip()
            or None
        )
    except OSError:
        versions["commit"] = None
    if torch.cuda.is_available():
        smi = shutil.which("nvidia-smi")
        if smi:
            query = "--query-gpu=driver_version,memory.total,clocks.max.sm"
            versions["nvidia_smi"] = subprocess.run(
                [smi, query, "--format=csv,noheader"], capture_output=True, text=True
            ).stdout.strip()
    return {"status": "done", **versions}


def stage_tests(out: Path, budget: float) -> dict:
    junit = out / "tests_junit.xml"
    # A module that cannot be collected there (a package the machine lacks) must not keep the
    # cuda tests of the others from running; it shows as an error in the counts.
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider"]
    cmd += ["--continue-on-collection-errors", "-v"]
    result = run([*cmd, f"--junitxml={junit}", "tests"], budget, out / "tests.log")
    counts = {"passed": 0, "failed": 0, "skipped": 0, "errors": 0}
    if not junit.is_file():  # stopped at the cap: count the verbose lines it printed so far
        for line in result["output"].splitlines():
            for word, key in (("PASSED", "passed"), ("FAILED", "failed"), ("SKIPPED", "skipped")):
                if "::" in line and f" {word}" in line:
                    counts[key] += 1
    else:
        import xml.etree.ElementTree as ET

        suite = ET.parse(junit).getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        total = int(suite.get("tests", 0))
        counts.update(
            failed=int(suite.get("failures", 0)),
            errors=int(suite.get("errors", 0)),
            skipped=int(suite.get("skipped", 0)),
        )
        counts["passed"] = total - counts["failed"] - counts["errors"] - counts["skipped"]
    status = "stopped" if result["returncode"] is None else "done"
    # pytest exits 5 when every collected test was deselected: nothing marked cuda ran
    ok = result["returncode"] in (0, 5)
    return {
        "status": status if ok or status == "stopped" else "failed",
        **counts,
        "seconds": result["seconds"],
        "summary": tail(result["output"]),
    }


def stage_finetune(out: Path, budget: float) -> dict:
    folder = out / "bench_finetune"
    folder.mkdir(exist_ok=True)
    cmd = [
        sys.executable,
        str(ROOT / "experiments" / "bench_finetune.py"),
        f"--data={ARGS.data}",
        f"--cache={cache_dir() / 'datasets'}",
        f"--out={folder}",
        "--variants=plain,icep",
        f"--time-limit={max(budget - 10, 5):.0f}",
        # a warm-up of batches, not a whole epoch: the reference loop's warm-up epoch would cost
        # as much as its measured one
        f"--warmup-batches={2 if ARGS.toy else 20}",
    ]
    if ARGS.toy:
        cmd += ["--device=cpu", "--model=resnet8", "--train-subset=600"]
    else:
        cmd += [f"--model={ARGS.model}"]
    result = run(cmd, budget, out / "bench_finetune.log")
    path = folder / "bench_finetune.json"
    if not path.is_file():
        if result["returncode"] is None:
            return {"status": "stopped", "reason": f"stopped at its cap of {budget:.0f}s"}
        return {"status": "failed", "reason": tail(result["output"], 2)}
    bench = json.loads(path.read_text())
    rows = {r["variant"]: r for r in bench["rows"]}
    fields = {
        "status": "done" if result["returncode"] == 0 else "failed",
        "model": bench.get("model"),
        "images_per_s": {v: r.get("images_per_s") for v, r in rows.items()},
        "errors": {v: r["error"] for v, r in rows.items() if "error" in r},
        "icep_over_plain": bench.get("icep_over_plain"),
        "goal": GOAL_FINETUNE,
        "goal_met": bench.get("goal_met"),
        "share_of_limit": {v: r.get("share_of_limit") for v, r in rows.items()},
        "limit": bench.get("limit"),
        "matmul": bench.get("matmul"),
    }
    if result["returncode"] is None:
        fields["status"] = "stopped"
    return fields


def cache_dir() -> Path:
    return Path(os.environ.get("ICEP_CACHE", ROOT / "outputs" / "cache"))


def committed_checkpoint() -> Path:
    return ROOT / "experiments" / "checkpoints" / f"{ARGS.model}_cifar10_dense.pt"


def stage_dense(out: Path, budget: float) -> dict:
    committed = committed_checkpoint()
    if committed.is_file() and not ARGS.retrain_dense and not ARGS.toy:
        return {"status": "skipped", "reason": f"{committed.relative_to(ROOT)} is committed"}
    run_dir = out / "dense"
    partial_dir = out / "dense_partial"
    if ARGS.resume_from is not None:  # the last finished epoch of a call that ran out of time
        for partial in (ARGS.resume_from / "dense_partial").glob("*.partial.pt"):
            (cache_dir() / "dense").mkdir(parents=True, exist_ok=True)
            shutil.copy2(partial, cache_dir() / "dense" / partial.name)
            log(f"dense: going on from {partial}")
    overrides = [
        f"+experiment={ARGS.model}_cifar10_fast",
        "pipeline=dense",
        *icep_args(),
        *(TOY_DENSE if ARGS.toy else []),
        f"hydra.run.dir={run_dir}",
    ]
    result = run([sys.executable, "-m", "icep", *overrides], budget, out / "dense.log")
    summary_path = run_dir / "summary.json"
    if result["returncode"] != 0 or not summary_path.is_file():
        partials = list((cache_dir() / "dense").glob(f"{ARGS.model}-*.partial.pt"))
        for partial in partials:  # returned, for --resume-from in the next call
            partial_dir.mkdir(exist_ok=True)
            shutil.copy2(partial, partial_dir / partial.name)
        stopped = result["returncode"] is None
        return {
            "status": "stopped" if stopped else "failed",
            "reason": (
                f"stopped after {result['seconds']:.0f}s; {len(partials)} partial training(s) "
                "returned in dense_partial/ (--resume-from goes on from them)"
                if stopped
                else tail(result["output"], 2)
            ),
        }
    summary = json.loads(summary_path.read_text())
    folder = out / "checkpoints"
    folder.mkdir(exist_ok=True)
    target = folder / f"{ARGS.model}_cifar10_dense.pt"
    shutil.copy2(run_dir / "model.pt", target)
    record = {
        "model": ARGS.model,
        "dataset": "cifar10 (JPEG archive)",
        "acc_test": summary["acc_test"],
        "acc_val": summary["acc_val"],
        "dense_seconds": summary.get("dense_seconds"),
        "dense_flops": summary.get("dense_flops"),
        "recipe": f"+experiment={ARGS.model}_cifar10_fast pipeline=dense",
        "overrides": overrides[:-1],
        "device": summary.get("device"),
        "date": datetime.date.today().isoformat(),
    }
    target.with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n")
    return {"status": "done", **record, "checkpoint": str(target.relative_to(out))}


def dense_checkpoint(out: Path) -> Path | None:
    if ARGS.checkpoint is not None:
        return ARGS.checkpoint
    trained = out / "checkpoints" / f"{ARGS.model}_cifar10_dense.pt"
    if trained.is_file():
        return trained
    if ARGS.resume_from is not None:
        earlier = ARGS.resume_from / "checkpoints" / trained.name
        if earlier.is_file():
            return earlier
    committed = committed_checkpoint()
    return committed if committed.is_file() and not ARGS.toy else None


def stage_compare(out: Path, budget: float) -> dict:
    checkpoint = dense_checkpoint(out)
    if checkpoint is None:
        return {
            "status": "skipped",
            "reason": "no dense model: run the dense stage first, or pass --checkpoint",
        }
    folder = out / "compare"
    folder.mkdir(exist_ok=True)
    experiment = "resnet56_cifar10_ice" if ARGS.model == "resnet56" else "resnet152_cifar10"
    overrides = [f"+experiment={experiment}", f"model.checkpoint={checkpoint.resolve()}"]
    overrides += icep_args()
    rows = []
    deadline = time.monotonic() + budget
    # ICE first: it is the short one; the baseline then gets the rest of the time.
    for variant in ("ice", "baseline"):
        earlier = ARGS.resume_from / "compare" / variant if ARGS.resume_from else None
        extra = []
        if earlier is not None and (earlier / "checkpoint.pt").is_file():
            shutil.copytree(earlier, folder / variant, dirs_exist_ok=True)
            extra = ["resume=true"]
            log(f"compare: {variant} goes on from {earlier}")
        elif earlier is not None and (earlier / "summary.json").is_file():
            shutil.copytree(earlier, folder / variant, dirs_exist_ok=True)
            rows.append({"variant": variant, **json.loads((earlier / "summary.json").read_text())})
            log(f"compare: {variant} finished in an earlier call ({earlier})")
            continue
        remaining = deadline - time.monotonic()
        if remaining < 5:
            rows.append({"variant": variant, "status": "skipped", "reason": "no time left"})
            continue
        rows.append(compare.run_variant(variant, [*overrides, *extra], folder, timeout=remaining))
    rows = compare.table(rows)
    (folder / "comparison.md").write_text(compare.markdown(rows, overrides))
    by = {r["variant"]: r for r in rows}
    fields: dict = {
        "status": "done" if all("time_total_s" in r for r in rows) else "stopped",
        "checkpoint": str(checkpoint),
        "rows": [
            {
                k: r.get(k)
                for k in (
                    "variant",
                    "status",
                    "reason",
                    "acc_original_test",
                    "acc_final_test",
                    "time_total_s",
                    "cost_flops",
                    "finetunes",
                    "steps",
                    "speedup",
                    "compute_speedup",
                    "macs_ratio",  # the measured inference latency, pruned over unpruned
                    "latency_b1_after_ms",
                    "inference_speedup_b1",
                    "latency_b256_after_ms",
                    "inference_speedup_b256",
                )
            }
            for r in rows
        ],
    }
    ice, base = by.get("ice", {}), by.get("baseline", {})
    if "speedup" in ice and "acc_final_test" in base:
        fields["accuracy_gap"] = ice["acc_final_test"] - base["acc_final_test"]
        fields["goal_accuracy_met"] = abs(fields["accuracy_gap"]) <= GOAL_ACC_POINTS
        fields["goal_speedup"] = ARGS.goal_speedup
        fields["goal_speedup_met"] = {
            "time": ice["speedup"] >= ARGS.goal_speedup,
            "compute": (ice.get("compute_speedup") or 0) >= ARGS.goal_speedup,
        }
    return fields


# --- results ------------------------------------------------------------------------------------


def markdown(results: dict) -> str:
    head = results.get("versions", {})
    lines = [
        f"# Device measurement: plan {ARGS.plan}{' (toy, CPU)' if ARGS.toy else ''}",
        "",
        f"Device {head.get('device')}; torch {head.get('torch')}, torchvision "
        f"{head.get('torchvision')}, CUDA {head.get('cuda')}, cuDNN {head.get('cudnn')}; "
        f"{head.get('date')}; commit {head.get('commit')}.",
        "",
        "| stage | status | result |",
        "|---|---|---|",
    ]
    for stage in ARGS.stage_list:
        r = results.get(stage)
        if r is None:
            lines.append(f"| {stage} | not reached | |")
            continue
        lines.append(f"| {stage} | {r['status']} | {safe_describe(stage, r)} |")
    compare_md = ARGS.out / "compare" / "comparison.md"
    if "compare" in results and compare_md.is_file():
        lines += ["", "## Baseline vs ICE (time and compute side by side)", ""]
        lines += compare_md.read_text().splitlines()[2:]
    return "\n".join(lines) + "\n"


def safe_describe(stage: str, r: dict) -> str:
    """:func:`describe`, or what went wrong describing it: the results are written anyway."""
    try:
        return describe(stage, r)
    except Exception as err:
        return f"(cannot describe: {type(err).__name__}: {err}; see measure.json)"


def describe(stage: str, r: dict) -> str:
    if r.get("reason"):
        return str(r["reason"]).replace("|", "/")
    if stage == "versions":
        return f"{r.get('device')}, python {r.get('python')}, optuna {r.get('optuna')}"
    if stage == "tests":
        return f"{r['passed']} passed, {r['failed']} failed, {r['skipped']} skipped"
    if stage == "finetune":
        ratio = r.get("icep_over_plain")
        shares = r.get("share_of_limit") or {}
        share = shares.get("icep")
        return (
            f"icep {ratio:.2f}x the reference loop (goal >= {GOAL_FINETUNE:g}x)"
            if ratio is not None
            else f"errors: {r.get('errors')}"
        ) + (f"; {100 * share:.1f}% of the matmul rate" if share is not None else "")
    if stage == "dense":
        took = (
            f"in {r['dense_seconds']:.0f}s"
            if r.get("dense_seconds") is not None
            else "(from icep's dense cache)"
        )
        return f"test {r['acc_test']:.2f}% {took} -> {r['checkpoint']}"
    if stage == "compare":
        if "accuracy_gap" not in r:
            return "incomplete: see compare/"
        ice = next(x for x in r["rows"] if x["variant"] == "ice")
        return (
            f"ICE {ice['speedup']:.2f}x faster in time, {ice['compute_speedup'] or 0:.2f}x in "
            f"compute, test accuracy {r['accuracy_gap']:+.2f} points vs the baseline"
        )
    return ""


def write(results: dict) -> None:
    (ARGS.out / "measure.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    (ARGS.out / "measure.md").write_text(markdown(results))


RUNS = {
    "tests": stage_tests,
    "finetune": stage_finetune,
    "dense": stage_dense,
    "compare": stage_compare,
}


def main(argv: list[str] | None = None) -> int:
    global ARGS
    try:
        ARGS = parse_args(argv)
        ARGS.out.mkdir(parents=True, exist_ok=True)
    except MeasureError as err:
        print(f"measure.py: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"measure.py: error: --out: cannot make it ({err.strerror})", file=sys.stderr)
        return 2
    needs = NEEDS_TOY if ARGS.toy else NEEDS
    results: dict = {"plan": ARGS.plan, "toy": ARGS.toy, "time_cap_s": ARGS.time_cap}
    ok = True
    for stage in ARGS.stage_list:
        cap = float("inf") if ARGS.toy else CAPS.get(stage, float("inf"))
        budget = min(left() - RESERVE_S, cap)
        if budget < needs[stage]:
            results[stage] = {
                "status": "skipped",
                "reason": f"needs ~{needs[stage]}s, {max(left() - RESERVE_S, 0):.0f}s left of "
                f"--time-cap {ARGS.time_cap:g}",
            }
            log(f"{stage}: skipped ({results[stage]['reason']})")
            ok = False
            write(results)
            continue
        log(f"{stage}: start ({budget:.0f}s at most)")
        started = time.monotonic()
        try:
            if stage == "versions":
                results[stage] = stage_versions()
            else:
                results[stage] = RUNS[stage](ARGS.out, budget)
        except Exception as err:  # one broken stage leaves the others measured
            results[stage] = {"status": "failed", "reason": f"{type(err).__name__}: {err}"[:300]}
        results[stage]["stage_seconds"] = time.monotonic() - started
        # a committed dense model is a skip that leaves nothing undone
        ok &= results[stage]["status"] == "done" or "is committed" in results[stage].get(
            "reason", ""
        )
        log(f"{stage}: {results[stage]['status']}: {safe_describe(stage, results[stage])}")
        write(results)
    print(markdown(results), flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
