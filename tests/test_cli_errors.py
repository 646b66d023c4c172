"""Bad input and numerical faults end as one line naming the problem and the fix (``icep: error:
...`` on stderr), exit code 2 and no traceback, and leave the results of earlier runs as they were.

Most cases call ``icep.app.main()`` in this process: the same code path as ``python -m icep``
without starting Python each time. A few run ``python -m icep`` for the command-line contract.
"""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest
import torch
from conftest import run_icep
from places import call_main, one_line, resolve

from icep import app

# --- the cases --------------------------------------------------------------------------------

# name -> (arguments, texts the line must hold: the problem and the fix). {checkpoint:KIND} and
# {data:KIND} stand for the files tests/places.py makes.
CASES = {
    "unknown model": (
        ["model=resnet57"],
        ["model=resnet57 is not an option", "choose", "resnet56"],
    ),
    "unknown dataset": (["dataset=cifar11"], ["dataset=cifar11 is not an option", "cifar10"]),
    "unknown criterion": (["criterion=l3"], ["criterion=l3 is not an option", "l1, l2"]),
    "unknown pipeline": (["pipeline=ice2"], ["pipeline=ice2 is not an option", "iterative"]),
    "unknown pipeline class": (
        ["pipeline._target_=icep.pipelines.ice.ICE2"],
        ["pipeline: cannot build icep.pipelines.ice.ICE2: "],
    ),
    "an argument the pipeline does not take": (
        ["+pipeline.thre2=1"],
        ["pipeline: cannot build icep.pipelines.ice.ICE: ", "'thre2'"],
    ),
    "unknown torchvision model": (
        ["model=torchvision", "model.name=resnet999"],
        ["model.name: unknown torchvision model 'resnet999'; e.g. "],
    ),
    "misspelled key": (["pipeline.ratoi=0.5"], ["pipeline.ratoi is not a config key", "ratio"]),
    "ratio above 1": (
        ["pipeline.ratio=1.5"],
        ["pipeline.ratio: got 1.5; must be a number strictly between 0 and 1"],
    ),
    "ratio zero": (["pipeline.ratio=0"], ["pipeline.ratio: got 0; must be", "between 0 and 1"]),
    "ratio negative": (["pipeline.ratio=-0.2"], ["pipeline.ratio: got -0.2; must be"]),
    "ratio not a number": (["pipeline.ratio=half"], ["pipeline.ratio: got 'half'; must be"]),
    "zero epochs": (
        ["pipeline.finetune.epochs=0"],
        ["pipeline.finetune.epochs: got 0; must be an integer >= 1"],
    ),
    "negative epochs": (["pipeline.finetune.epochs=-1"], ["pipeline.finetune.epochs: got -1"]),
    "zero dense epochs": (["dense.epochs=0"], ["dense.epochs: got 0; must be an integer >= 1"]),
    "negative final epochs": (
        ["pipeline.final_finetune_epochs=-1"],
        ["pipeline.final_finetune_epochs: got -1; must be an integer >= 0"],
    ),
    "final epochs on a schedule": (
        ["pipeline=iterative_geometric", "pipeline.final_finetune_epochs=2"],
        [
            "pipeline.final_finetune_epochs: is for schedule=blockwise",
            "leave final_finetune_epochs out",
        ],
    ),
    "ties unknown": (["ties=random"], ["ties: got 'random'; must be stable or sort"]),
    "amp dtype unknown": (
        ["trainer.amp_dtype=fp8"],
        ["trainer.amp_dtype: got 'fp8'; must be bfloat16 or float16"],
    ),
    "step share zero": (
        ["pipeline.step_train_fraction=0"],
        ["pipeline.step_train_fraction: got 0; must be null or a number in (0, 1]"],
    ),
    "thre negative": (["pipeline.thre=-1"], ["pipeline.thre: got -1; must be a number >= 0"]),
    "fr above 1": (["pipeline.fr=1.5"], ["pipeline.fr: got 1.5; must be a number in [0, 1]"]),
    "p zero": (["pipeline.p=0"], ["pipeline.p: got 0; must be a number strictly between 0 and 1"]),
    "p one": (["pipeline.p=1"], ["pipeline.p: got 1; must be a number strictly between 0 and 1"]),
    "beta zero": (["pipeline.beta=0"], ["pipeline.beta: got 0; must be a number > 0"]),
    "delta negative": (
        ["pipeline.delta=-0.1"],
        ["pipeline.delta: got -0.1; must be a number >= 0"],
    ),
    "delta above base": (
        ["pipeline.delta=0.002"],
        ["pipeline.delta: got 0.002; must be below pipeline.base (0.001)"],
    ),
    "lr zero": (
        ["pipeline=iterative", "pipeline.finetune.lr=0"],
        ["pipeline.finetune.lr: got 0; must be a number > 0"],
    ),
    "unknown device": (["trainer.device=tpu"], ["trainer.device: got 'tpu'; use auto, cpu"]),
    "bad_images value": (
        ["dataset=image_folder", "dataset.bad_images=ignore"],
        ["dataset.bad_images: got 'ignore'; must be error or skip"],
    ),
    "missing checkpoint": (
        ["model.checkpoint=/nonexistent/model.pt"],
        ["model.checkpoint: /nonexistent/model.pt does not exist; give the path of a trained"],
    ),
    "checkpoint of another architecture": (
        ["model.checkpoint={checkpoint:other_architecture}"],
        [
            "model.checkpoint: ",
            "other_architecture.pt does not fit this model",
            "model= and dataset=",
        ],
    ),
    "checkpoint of another class count": (
        ["model.checkpoint={checkpoint:other_classes}"],
        ["other_classes.pt does not fit this model (shape of fc.weight", "class count"],
    ),
    "truncated checkpoint": (
        ["model.checkpoint={checkpoint:truncated}"],
        ["model.checkpoint: ", "truncated.pt cannot be read", "give a state dict or .safetensors"],
    ),
    "checkpoint without a state dict": (
        ["model.checkpoint={checkpoint:not_a_state_dict}"],
        ["not_a_state_dict.pt holds no state dict", "torch.save(model.state_dict(), path)"],
    ),
    "missing dataset folder": (
        ["dataset=image_folder", "dataset.root=/nonexistent/imagenet"],
        ["dataset.root: /nonexistent/imagenet does not exist; expected a folder holding train/"],
    ),
    "empty dataset folder": (
        ["dataset=image_folder", "dataset.root={data:empty}"],
        ["dataset.root: ", "empty holds no train/ folder; expected a folder holding train/"],
    ),
    "dataset without class folders": (
        ["dataset=image_folder", "dataset.root={data:no_class_folders}"],
        ["dataset.root: Couldn't find any class folder in", "expected a folder holding train/"],
    ),
    "dataset root at a split": (
        ["dataset=image_folder", "dataset.root={data:split}"],
        ["holds no train/ folder", "it is one split of a tree: set dataset.root="],
    ),
    "damaged dataset archive": (
        ["dataset=image_folder", "dataset.root={data:damaged_archive}"],
        ["dataset.root: ", "tiny.tar.gz cannot be unpacked", "copy or download it again"],
    ),
    "cifar10 folder without the data": (
        ["dataset=cifar10", "dataset.root={data:empty}"],
        ["dataset.root: ", "holds no CIFAR-10", "dataset.download=true"],
    ),
    "undecodable image": (
        [
            "dataset=image_folder",
            "dataset.root={data:undecodable}",
            "dataset.image_size=8",
            "dense.epochs=1",
            "trainer.num_workers=1",  # the error comes from a DataLoader worker
        ],
        ["dataset: cannot decode image ", "2.png (", "set dataset.bad_images=skip"],
    ),
    "run folder under a file": (
        ["hydra.run.dir={file}/run"],
        [
            "cannot create the run folder (Not a directory: ",
            "pick a writable folder with hydra.run.dir=",
        ],
    ),
    "outputs under a file": (
        ["paths.outputs={file}"],
        ["cannot create the run folder (Not a directory: ", "paths.outputs="],
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_clear_line(case, place, monkeypatch, capsys):
    args, must_say = CASES[case]
    args = resolve(args, place)
    own_run_dir = not any(a.startswith(("hydra.run.dir=", "paths.outputs=")) for a in args)
    line = one_line(*call_main(args, place, monkeypatch, capsys, run_dir=own_run_dir))
    for text in must_say:
        assert text in line, line
    assert not (place.run_dir / "metrics.jsonl").exists()
    place.assert_untouched()


def test_read_only_outputs_folder(place, monkeypatch, capsys):
    # Permissions do not stop root, who runs the tests in containers: refuse the mkdir instead.
    read_only = place.files / "read-only"
    mkdir = Path.mkdir

    def refuse(self, *args, **kwargs):
        if self == read_only or read_only in self.parents:
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", refuse)
    code, out, err = call_main([f"paths.outputs={read_only}"], place, monkeypatch, capsys, False)
    line = one_line(code, out, err)
    assert line.startswith(f"cannot create the run folder (Permission denied: {read_only}/")
    assert line.endswith(
        "pick a writable folder with hydra.run.dir=... (hydra.sweep.dir=... with -m) or paths.outputs=..."
    )
    place.assert_untouched()


def test_damaged_dense_cache_says_to_delete_it(place, monkeypatch, capsys):
    cached = place.cache / "dense" / "resnet20-digits-0123456789ab.pt"
    monkeypatch.setattr("icep.dense.cache_path", lambda *args: cached)
    line = one_line(*call_main([], place, monkeypatch, capsys))
    assert line.startswith(f"the cached dense model is damaged: {cached} is not a readable")
    assert line.endswith("delete it to train it again, or set dense.cache=false")
    place.assert_untouched()


@pytest.mark.parametrize(
    ("error", "must_say"),
    [
        (
            torch.cuda.OutOfMemoryError(
                "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has"
            ),
            "CUDA out of memory (Tried to allocate 2.00 GiB); lower trainer.batch_size and "
            "trainer.eval_batch_size, or free the GPU of other work",
        ),
        (
            OSError(errno.ENOSPC, "No space left on device", "/data/out/model.pt"),
            "No space left on device: /data/out/model.pt; free some space, or write elsewhere "
            "with paths.outputs=... / paths.cache=...",
        ),
        (
            PermissionError(errno.EACCES, "Permission denied", "/shared/cache/dense"),
            "Permission denied: /shared/cache/dense; fix its permissions, or use other folders: "
            "paths.outputs=..., paths.cache=... (or $ICEP_CACHE), dataset.root=...",
        ),
    ],
)
def test_faults_outside_the_trainer_are_one_line(error, must_say):
    assert app.describe_error(error) == must_say


def test_a_bug_keeps_its_traceback():
    assert app.describe_error(KeyError("weight")) is None


# --- python -m icep ---------------------------------------------------------------------------

# One case per place an error can come from; an error deep in a run: the NaN test below.
CLI_CASES = [
    "unknown model",  # Hydra's composition
    "ratio above 1",  # the config check
    "run folder under a file",  # Hydra making the run folder
]


@pytest.mark.parametrize("case", CLI_CASES)
def test_command_line_contract(case, place):
    args = resolve(CASES[case][0], place)
    run_dir = place.files / "a-file" / "run" if case == "run folder under a file" else place.run_dir
    result = run_icep([f"paths.outputs={place.outputs}", *args], run_dir, place.cache)
    line = one_line(result.returncode, result.stdout, result.stderr)
    for text in CASES[case][1]:
        assert text in line, line
    place.assert_untouched()


def test_nan_loss_fails_the_run_and_wandb_offline_fallback(place):
    """A good run first (W&B online with no reachable server: it logs offline and goes on), then
    a fine-tune at an absurd learning rate: one line, exit 2, summary.json says why, and the good
    run and the dense model it cached are untouched."""
    tiny = [
        "dense.epochs=1",
        "dataset.train_subset=300",
        "trainer.batch_size=64",
        "trainer.device=cpu",
    ]
    tiny.append(f"paths.outputs={place.outputs}")
    good_dir = place.outputs / "default" / "good-run"
    wandb = ["logger=wandb", "logger.mode=online", "logger.project=icep-test"]
    env = {"WANDB_BASE_URL": "http://127.0.0.1:9", "WANDB_API_KEY": "0" * 40}
    good = run_icep([*tiny, "pipeline=dense", *wandb], good_dir, place.cache, env=env)
    assert good.returncode == 0, good.stderr
    said = [line for line in (good.stdout + good.stderr).splitlines() if "W&B" in line]
    assert len(said) == 1, good.stdout + good.stderr
    assert "http://127.0.0.1:9 cannot be reached" in said[0] and "logging offline" in said[0]
    assert json.loads((good_dir / "summary.json").read_text())["status"] == "completed"
    assert list((good_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    place.before = place._snapshot()  # now with the good run and its cached dense model
    assert any(p.parent.name == "dense" and "digits" in p.name for p in place.before)

    result = run_icep(
        [*tiny, "pipeline=iterative", "pipeline.finetune.lr=1e30"], place.run_dir, place.cache
    )
    line = one_line(result.returncode, result.stdout, result.stderr)
    assert "fine-tune" in line and "epoch 1/1: the loss became " in line, line
    assert (
        "(lr 1e+30); the learning rate is too high for this model: lower pipeline.finetune.lr"
        in line
    )
    summary = json.loads((place.run_dir / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["reason"] == line
    place.assert_untouched()


def test_an_empty_icep_cache_means_unset(place, monkeypatch, capsys, tmp_path):
    """ICEP_CACHE= (set, empty) caches in the user's cache as if unset, not in the current
    folder."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    real_setenv = monkeypatch.setenv

    def setenv(name, value, prepend=None):
        real_setenv(name, "" if name == "ICEP_CACHE" else value, prepend)

    monkeypatch.setattr(monkeypatch, "setenv", setenv)
    args = ["pipeline=dense", "dense.epochs=1", "dataset.train_subset=100"]
    code, out, err = call_main(args, place, monkeypatch, capsys)
    assert code == 0, err
    assert list((tmp_path / "xdg" / "icep" / "dense").glob("resnet20-digits-*.pt"))
    assert not (tmp_path / "dense").exists()
