"""Adding a pipeline is one module plus one YAML file: the README's example, as written there,
runs end to end from outside the package (a module on PYTHONPATH, a config folder added with
hydra.searchpath)."""

from __future__ import annotations

import json
import re

from conftest import FAST, ROOT, run_icep


def readme_block(first_line: str) -> str:
    """The README's fenced code block that starts with ``first_line``."""
    text = (ROOT / "README.md").read_text()
    for block in re.findall(r"```\w*\n(.*?)```", text, flags=re.S):
        if block.startswith(first_line + "\n"):
            return block
    raise AssertionError(f"README.md has no code block starting {first_line!r}")


def test_the_readme_example_pipeline_runs(tmp_path, cache_dir):
    module = readme_block("# icep/pipelines/prune_twice.py")
    config = readme_block("# conf/pipeline/prune_twice.yaml")
    (tmp_path / "prune_twice.py").write_text(module)
    (tmp_path / "conf" / "pipeline").mkdir(parents=True)
    target = "_target_: icep.pipelines.prune_twice.PruneTwice"
    assert target in config
    outside = config.replace(target, "_target_: prune_twice.PruneTwice")
    (tmp_path / "conf" / "pipeline" / "prune_twice.yaml").write_text(outside)

    args = [*FAST, "pipeline=prune_twice", f"hydra.searchpath=[file://{tmp_path / 'conf'}]"]
    result = run_icep(args, tmp_path / "run", cache_dir, env={"PYTHONPATH": str(tmp_path)})
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["pipeline"] == "prune_twice" and summary["steps"] == summary["finetunes"] == 9
    assert summary["params_after"] < summary["params_before"]
    assert summary["time_prune_s"] > 0 and summary["flops_finetune"] > 0  # the run timed it
