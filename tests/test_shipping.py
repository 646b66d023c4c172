"""A pruned model you can ship (issue 19): the model file describes itself and loads without
pickle, icep's own output is a valid model.checkpoint, ``python -m icep.eval`` measures it with a
run's data config, and ``python -m icep.export`` writes ONNX, a torch.export program and
safetensors, each checked against the PyTorch model."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import FAST, read_jsonl, run_icep

from icep import eval as icep_eval
from icep import export as icep_export
from icep.models import cifar_resnet, load_checkpoint
from icep.pruning import L1, PruningEngine
from icep.serialization import load_model, save_model

ARCH = {
    "_target_": "icep.models.cifar_resnet",
    "depth": 8,
    "num_classes": 4,
    "in_channels": 3,
    "shortcut": "B",
}
PREPROCESSING = {
    "input_shape": [3, 16, 16],
    "scale": 1 / 255,
    "mean": [0.5, 0.5, 0.5],
    "std": [0.25, 0.25, 0.25],
    "resize": 16,
    "crop": 16,
    "fit": "crop",
}
CLASSES = ["ant", "bee", "cat", "dog"]


def pruned_model_file(path):
    """A ResNet-8 with units cut to widths no GPU likes (13 of 16...), saved as a run saves one."""
    torch.manual_seed(0)
    model = cifar_resnet(8, num_classes=4, in_channels=3).eval()
    engine = PruningEngine(model, torch.zeros(1, 3, 16, 16))
    for unit in range(len(engine.units)):
        engine.prune_unit(unit, 0.2, L1())
    save_model(model, ARCH, path, model="resnet8", preprocessing=PREPROCESSING, classes=CLASSES)
    return model


def _main(module, argv, capsys) -> tuple[int, str, str]:
    capsys.readouterr()
    try:
        module.main(argv)
        code = 0
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.slow  # two runs and two evaluations: 30 s
def test_a_runs_model_describes_itself_is_evaluated_and_pruned_further(
    tmp_path, cache_dir, capsys, monkeypatch
):
    first, second = tmp_path / "first", tmp_path / "second"
    done = run_icep([*FAST, "pipeline=one_shot"], first, cache_dir)
    assert done.returncode == 0, done.stderr
    summary = json.loads((first / "summary.json").read_text())

    # 1. Self-describing, and plain data: torch.load(weights_only=True) reads it.
    blob = torch.load(first / "model.pt", weights_only=True)
    meta = blob["meta"]
    assert meta["preprocessing"] == {
        "input_shape": [1, 8, 8],
        "scale": 1 / 16,
        "mean": [0.3053],
        "std": [0.376],
        "resize": None,
        "crop": None,
        "fit": None,
    }
    assert meta["classes"] == [str(d) for d in range(10)]
    assert meta["model"] == "resnet20"
    assert meta["dataset"]["name"] == "digits" and meta["dataset"]["train_subset"] == 700
    assert meta["seed"] == 0
    assert meta["summary"]["acc_final_test"] == summary["acc_final_test"]
    assert meta["summary"]["params_after"] == summary["params_after"]
    from importlib.metadata import version

    assert meta["versions"]["torch"] == torch.__version__  # with its build: 2.14.1+cu130
    # the installed release (Torch-Pruning 1.6.1's own __version__ says 1.6.0)
    assert meta["versions"]["torch-pruning"] == version("torch-pruning")
    assert meta["versions"]["icep"] and meta["versions"]["python"]
    assert (
        sum(p.numel() for p in load_model(first / "model.pt").parameters())
        == (summary["params_after"])
    )

    # 3. icep.eval measures it on the data it was pruned on, as the run did.
    monkeypatch.setenv("ICEP_CACHE", str(cache_dir))
    code, out, err = _main(icep_eval, [str(first / "model.pt"), "format=json"], capsys)
    assert code == 0, err
    measured = json.loads(out)
    assert measured["dataset"] == "digits" and measured["split"] == "test"
    assert measured["images"] == 360 and measured["params"] == summary["params_after"]
    assert abs(measured["accuracy"] - summary["acc_final_test"]) <= 100 / 360  # one image
    code, out, err = _main(icep_eval, [str(first / "model.pt"), "split=val"], capsys)
    assert code == 0, err
    assert (
        out.startswith(f"icep: {first / 'model.pt'}: val accuracy ") and "70 digits images" in out
    )

    # 2. The pruned model goes on being pruned: the next run starts at its size.
    done = run_icep(
        [*FAST, "pipeline=one_shot", "pipeline.target=0.3", f"model.checkpoint={first}/model.pt"],
        second,
        cache_dir,
    )
    assert done.returncode == 0, done.stderr
    again = json.loads((second / "summary.json").read_text())
    assert again["params_before"] == summary["params_after"]
    assert again["macs_before"] == summary["macs_after"]
    assert again["params_after"] < again["params_before"]
    assert len(read_jsonl(second / "metrics.jsonl")) == again["steps"] > 0
    assert again["dense"]["source"] == f"{first}/model.pt"


def test_export_writes_three_files_each_checked_and_usable_without_icep(tmp_path, capsys):
    import onnx
    import onnxruntime

    model = pruned_model_file(tmp_path / "model.pt")
    code, out, err = _main(icep_export, [str(tmp_path / "model.pt")], capsys)
    assert code == 0, err
    lines = out.splitlines()
    assert (
        lines[0]
        == f"icep: exported {tmp_path / 'model.pt'}, checked against the PyTorch model (fp32):"
    )
    for line, kind, suffix in zip(
        lines[1:],
        ("onnx", "program", "safetensors"),
        (".onnx", ".pt2", ".safetensors"),
        strict=True,
    ):
        assert line.split()[:2] == [kind, str(tmp_path / f"model{suffix}")], out
        assert line.endswith("(ok)"), out
    assert "onnxruntime" in lines[1] and "batches 8 and 9" in lines[1]

    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        expected = model(x)
    # ONNX in onnxruntime, at a batch size the check did not use; preprocessing in its metadata.
    session = onnxruntime.InferenceSession(str(tmp_path / "model.onnx"))
    (logits,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    torch.testing.assert_close(torch.from_numpy(logits), expected, rtol=0, atol=1e-4)
    props = {p.key: p.value for p in onnx.load(tmp_path / "model.onnx").metadata_props}
    assert json.loads(props["icep.classes"]) == CLASSES
    assert json.loads(props["icep.preprocessing"]) == PREPROCESSING
    # The torch.export program runs on torch alone.
    program = torch.export.load(tmp_path / "model.pt2").module()
    torch.testing.assert_close(program(x), expected, rtol=0, atol=1e-5)
    # safetensors: the weights, and what rebuilds the pruned model, for load_model and
    # model.checkpoint alike.
    from safetensors import safe_open

    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        assert json.loads(f.metadata()["meta"])["classes"] == CLASSES
    with torch.no_grad():
        torch.testing.assert_close(load_model(tmp_path / "model.safetensors")(x), expected)
        fresh = cifar_resnet(8, num_classes=4, in_channels=3)
        loaded = load_checkpoint(fresh, tmp_path / "model.safetensors", ARCH).eval()
        torch.testing.assert_close(loaded(x), expected)


def test_export_formats_and_folder_are_chosen(tmp_path, capsys):
    pruned_model_file(tmp_path / "model.pt")
    argv = [str(tmp_path / "model.pt"), "formats=safetensors", f"out={tmp_path / 'ship'}"]
    code, out, err = _main(icep_export, argv, capsys)
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "ship").iterdir()) == ["model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt", "ship"]


def test_an_export_that_does_not_match_fails_naming_it(tmp_path, capsys, monkeypatch):
    """A check above atol is a failed export: exit 1, the format named."""
    pruned_model_file(tmp_path / "model.pt")
    monkeypatch.setattr(icep_export, "_difference", lambda ours, theirs: 0.5)
    code, out, err = _main(icep_export, [str(tmp_path / "model.pt"), "formats=program"], capsys)
    assert code == 1
    assert "max |diff| 5.00e-01" in out and "(ABOVE 0.0001)" in out
    assert err.splitlines()[-1] == "icep: error: program did not pass"


# name -> (module, arguments after the model file, the line)
BAD = {
    "eval without a file": (
        icep_eval,
        None,
        "give one model file, then KEY=VALUE settings; got no model file",
    ),
    "eval a split it has not": (
        icep_eval,
        ["dataset=synthetic", "split=train"],
        "split: got 'train'; must be test or val",
    ),
    "eval an unknown key": (icep_eval, ["splt=val"], "splt is not a config key"),
    "export an unknown format": (
        icep_export,
        ["formats=onnx,tflite"],
        "formats: got 'onnx,tflite'; choose from onnx, program, safetensors",
    ),
    "export an unknown key": (
        icep_export,
        ["opset=18"],
        "opset is not an export key; keys: formats",
    ),
    "export a file that is not a model": (
        icep_export,
        "not-a-model",
        "is not a readable icep model file",
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_a_bad_model_command_is_one_line(case, tmp_path, capsys):
    module, args, says = BAD[case]
    pruned_model_file(tmp_path / "model.pt")
    if args is None:
        argv = []
    elif args == "not-a-model":
        (tmp_path / "notes.pt").write_text("not a model")
        argv = [str(tmp_path / "notes.pt")]
    else:
        argv = [str(tmp_path / "model.pt"), *args]
    code, out, err = _main(module, argv, capsys)
    assert code == 2 and "Traceback" not in err
    (line,) = err.splitlines()
    assert line.startswith("icep: error: ") and says in line, line


def test_onnx_without_onnxruntime_says_what_to_install(tmp_path, capsys, monkeypatch):
    import sys

    pruned_model_file(tmp_path / "model.pt")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails, as when not installed
    code, out, err = _main(icep_export, [str(tmp_path / "model.pt"), "formats=onnx"], capsys)
    assert code == 2
    assert err.splitlines()[-1] == (
        "icep: error: ONNX export needs onnx, onnxscript and onnxruntime: pip install "
        "'icep[export]' (or formats=program,safetensors)"
    )
    assert not (tmp_path / "model.onnx").exists()
