"""Bring your own model: torchvision and timm families through the pre-flight check, a few
pruning steps and a reload with identical outputs, or a clean one-line refusal; the ``ice`` and
``iterative`` pipelines end to end on a handful. The README's model table is this matrix."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import hydra.utils
import pytest
import torch

from icep.errors import IcepError
from icep.preflight import preflight
from icep.pruning import L1, PruningEngine, ignored_modules
from icep.serialization import load_model, save_model
from tests.conftest import ROOT, read_jsonl, run_icep

TV, TIMM = "torchvision", "timm"


@dataclass
class Family:
    library: str
    name: str
    result: int | str  # the number of units, or the refusal's words
    unit: str  # what a unit is, or why the family is refused, in the README's words
    size: int = 32  # input height and width
    arch: dict[str, Any] = field(default_factory=dict)  # extra builder keys (+model.arch.KEY)
    ignored: list[str] = field(default_factory=list)  # model.ignored_layers

    @property
    def id(self) -> str:
        return f"{self.library}-{self.name}"

    def readme_row(self) -> list[str]:
        keys = "".join(f" `+model.arch.{k}={str(v).lower()}`" for k, v in self.arch.items())
        if self.ignored:
            keys += f" `model.ignored_layers=[{','.join(self.ignored)}]`"
        result = str(self.result) if isinstance(self.result, int) else f"refused: {self.result}"
        return [self.library, f"`{self.name}`{keys}", result, self.unit]

    def build(self) -> torch.nn.Module:
        torch.manual_seed(0)
        return hydra.utils.instantiate(self.arch_spec())

    def arch_spec(self) -> dict[str, Any]:
        builder = "torchvision_model" if self.library == TV else "timm_model"
        return {
            "_target_": f"icep.models.{builder}",
            "name": self.name,
            "num_classes": 10,
            "in_channels": 3,
            **self.arch,
        }


NO_UNIT = "has no pruning unit"
MATRIX = [
    Family(TV, "resnet18", 8, "BasicBlock: `conv1`"),
    Family(TV, "resnet50", 16, "Bottleneck: `conv1`, `conv2`"),
    Family(TV, "resnext50_32x4d", 16, "Bottleneck: `conv1`, grouped `conv2` (32 groups cut alike)"),
    Family(TV, "densenet121", 58, "dense layer: the 1x1 bottleneck `conv1`"),
    Family(TV, "mobilenet_v2", 17, "inverted residual: the expansion conv"),
    Family(TV, "mobilenet_v3_small", 12, "inverted residual: expansion + SE squeeze"),
    Family(TV, "mnasnet0_5", 17, "inverted residual: the expansion conv"),
    Family(TV, "efficientnet_b0", 16, "MBConv: expansion + SE squeeze"),
    Family(TV, "regnet_x_400mf", 22, "X block: `a`, grouped `b`"),
    Family(TV, "regnet_y_400mf", 16, "Y block: `a`, grouped `b`, SE squeeze"),
    Family(TV, "convnext_tiny", 18, "ConvNeXt block: the MLP's hidden width (linear)"),
    Family(TV, "squeezenet1_1", 8, "fire module: the squeeze conv"),
    Family(TV, "googlenet", 11, "inception: the 1x1 reductions", arch={"aux_logits": False}),
    Family(TV, "googlenet", "returns a GoogLeNetOutputs in training mode", "auxiliary outputs"),
    Family(TV, "shufflenet_v2_x0_5", "Torch-Pruning cannot trace it", "channel shuffle"),
    Family(TV, "swin_t", "has attention layers", "a transformer"),
    Family(TV, "vit_b_16", "fails on 3x32x32 inputs", "needs 224x224 inputs; a transformer"),
    Family(TIMM, "resnet18", 8, "BasicBlock: `conv1`"),
    Family(TIMM, "seresnext26d_32x4d", 10, "`conv1`, grouped `conv2`, SE; 2 deep-stem convs"),
    Family(TIMM, "cspresnet50", 17, "bottleneck: `conv1`, `conv2`"),
    Family(TIMM, "regnetx_002", 13, "X block: `conv1`, grouped `conv2`"),
    Family(TIMM, "dla34", 15, "basic block: `conv1`; level convs"),
    Family(TIMM, "ese_vovnet19b_dw", 5, "OSA stage: the pointwise convs"),
    Family(TIMM, "efficientnet_b0", 16, "MBConv: expansion + SE squeeze"),
    Family(TIMM, "tinynet_e", 10, "MBConv: expansion + SE squeeze"),
    Family(TIMM, "fbnetc_100", 21, "inverted residual: the expansion conv"),
    Family(TIMM, "lcnet_050", 13, "depthwise-separable block: the pointwise conv"),
    Family(TIMM, "ghostnet_100", 17, "Ghost bottleneck: the primary conv of `ghost1`"),
    Family(TIMM, "convnext_atto", 14, "ConvNeXt block: the MLP's hidden width (linear)"),
    Family(TIMM, "repvgg_a0", NO_UNIT, "every conv's output is on a residual sum"),
    Family(TIMM, "res2net50_14w_8s", NO_UNIT, "split-and-concatenate ties every width"),
    Family(
        TIMM, "mixnet_s", "pruning units 0 (blocks.2.0), 4", "mixed kernels split by fixed sizes"
    ),
    Family(TIMM, "mobilevitv2_050", "has attention layers", "attention blocks"),
    Family(
        TIMM,
        "mobilevitv2_050",
        17,
        "the convs and 1x1-conv MLPs around the attention",
        ignored=["stages.*.1.transformer.*.attn"],
    ),
    Family(TIMM, "rexnet_100", "did not finish within", "Torch-Pruning's grouping loops"),
]
PREFLIGHT_SECONDS = 5  # rexnet_100's graph never finishes; the others take well under a second


@pytest.mark.slow
@pytest.mark.parametrize("family", MATRIX, ids=[f"{f.id}-{i}" for i, f in enumerate(MATRIX)])
def test_a_family_prunes_and_reloads_or_is_refused_in_one_line(family, tmp_path):
    model = family.build()
    shape = (3, family.size, family.size)
    if isinstance(family.result, str):
        with pytest.raises(IcepError) as refusal:
            preflight(model, shape, 10, name=family.name, seconds=PREFLIGHT_SECONDS, ignored=[])
        message = str(refusal.value)
        assert family.result in message and "\n" not in message
        assert message.startswith(f"model {family.name}")
        return
    report = preflight(
        model, shape, 10, name=family.name, seconds=PREFLIGHT_SECONDS, ignored=family.ignored
    )
    assert len(report.units) == family.result
    assert sum(u.params_share for u in report.units) > 0

    ignored = ignored_modules(model, family.ignored, family.name)
    engine = PruningEngine(model, torch.zeros(1, *shape), ignored)
    widths = engine.unit_widths()
    for unit in engine.units[:3]:
        engine.prune_unit(unit.index, 0.5, L1())
    assert sum(engine.unit_widths().values()) < sum(widths.values())
    assert engine.remaining() < 1.0
    x = torch.randn(2, *shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model.eval()(x)
    save_model(model, family.arch_spec(), tmp_path / "model.pt")
    with torch.no_grad():
        reloaded = load_model(tmp_path / "model.pt")(x)
    assert torch.equal(reloaded, expected)


def tiny_run(library: str, name: str, pipeline: str) -> list[str]:
    """Overrides for a whole run of ``pipeline`` on a tiny synthetic set: one dense epoch, one
    fine-tune epoch per step."""
    return [
        f"model={library}",
        f"model.name={name}",
        "dataset=synthetic",
        "dataset.num_samples=64",
        "dataset.num_test=32",
        "dense.epochs=1",
        "trainer.batch_size=32",
        f"pipeline={pipeline}",
        "pipeline.finetune.epochs=1",
    ]


END_TO_END = [
    (TV, "mobilenet_v3_small"),
    (TV, "mnasnet0_5"),
    (TV, "regnet_y_400mf"),
    (TIMM, "ghostnet_100"),
    (TIMM, "convnext_atto"),
]


@pytest.mark.slow
@pytest.mark.parametrize("pipeline", ["ice", "iterative"])
@pytest.mark.parametrize("library,name", END_TO_END, ids=[n for _, n in END_TO_END])
def test_pipelines_run_end_to_end_and_the_model_reloads(library, name, pipeline, tmp_path):
    family = next(f for f in MATRIX if (f.library, f.name) == (library, name))
    out = tmp_path / "run"
    # Fine-tune after every step (ICE), so every step trains the pruned model.
    trigger = ["pipeline.trigger=false"] if pipeline == "ice" else []
    result = run_icep(
        [*tiny_run(library, name, pipeline), *trigger], out, tmp_path / "cache", timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    steps = [row for row in read_jsonl(out / "metrics.jsonl") if "step" in row]
    assert len(steps) == family.result  # one step per unit
    model = load_model(out / "model.pt")
    params = sum(p.numel() for p in model.parameters())
    final = json.loads((out / "summary.json").read_text())
    assert final["status"] == "completed"
    assert params == final["params_after"] < final["params_before"]
    assert final["remaining"] < 1.0
    with torch.no_grad():
        assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


def test_the_readme_model_table_is_the_tested_matrix():
    """Every row of the README's model table is a family the slow matrix test runs, with the
    result it checks, in the same order."""
    text = (ROOT / "README.md").read_text()
    lines = text[text.index("| library | model | units | what a unit is |") :].splitlines()
    rows = []
    for line in lines[2:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    assert rows == [family.readme_row() for family in MATRIX]


@pytest.mark.slow
@pytest.mark.parametrize("library,name", [(TIMM, "regnetx_002"), (TIMM, "convnext_atto")])
def test_grouped_and_linear_units_resume_after_a_kill_to_the_same_metrics(library, name, tmp_path):
    """A checkpoint rebuilds grouped widths (RegNetX) and linear widths (ConvNeXt's MLP) on the
    unpruned model before it loads the weights."""
    args = tiny_run(library, name, "iterative")
    cache = tmp_path / "cache"
    full, killed = tmp_path / "full", tmp_path / "killed"
    assert run_icep(args, full, cache, timeout=600).returncode == 0
    assert run_icep(args, killed, cache, timeout=600, kill_in_checkpoint=3).returncode < 0
    resumed = run_icep([*args, "resume=true"], killed, cache, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "after step 2" in resumed.stdout

    def rows(out):
        return [
            {k: v for k, v in row.items() if not k.startswith("t_")}
            for row in read_jsonl(out / "metrics.jsonl")
        ]

    assert rows(killed) == rows(full)
    resumed_state = load_model(killed / "model.pt").state_dict()
    full_state = load_model(full / "model.pt").state_dict()
    assert resumed_state.keys() == full_state.keys()
    assert all(torch.equal(resumed_state[k], full_state[k]) for k in full_state)
