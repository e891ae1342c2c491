"""The package's shape: layers in one direction, no import circles, imports at the top, and each
stage's code dependencies computed from its imports (the same for DVC and Prefect)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from lmcore.core import imports
from lmcore.stages import ENTRY_MODULES, ORDER, code_deps, code_fingerprint

# Lowest first. A module may import from a lower layer, or from its own top-level package (the
# modules of lmcore.data import each other); never from a higher layer or from another package of
# the same layer (train, generate and export do not know each other).
LAYERS: list[tuple[str, ...]] = [
    ("lmcore", "lmcore.core"),  # errors, io, layout, machine, readers, task registry, import graph
    ("lmcore.config",),  # params.yaml into typed settings
    ("lmcore.tracking", "lmcore.tracking_server", "lmcore.model"),  # MLflow runs, the tracking server; the decoder
    ("lmcore.data",),  # prepare, clean, tokenizer, encode, token shards, GLUE loaders and metrics
    ("lmcore.train", "lmcore.generate", "lmcore.export"),
    ("lmcore.eval",),  # the evaluate stage, run comparison
    ("lmcore.stages",),  # each stage wired to params.yaml and the layout
    ("lmcore.summary", "lmcore.lineage"),  # what one pipeline execution did; the chain behind a run
    ("lmcore.report", "lmcore.plots"),  # one execution's HTML page; dvc plots offline
    ("lmcore.launch",),  # the training stages under accelerate launch, for DVC and Prefect
    ("lmcore.cli",),  # argument parsing and printing
]


def unit(module: str) -> tuple[int, str]:
    """(layer index, the package of LAYERS that holds ``module``)."""
    best: tuple[int, str] | None = None
    for rank, names in enumerate(LAYERS):
        for n in names:
            if (module == n or module.startswith(n + ".")) and (best is None or len(n) > len(best[1])):
                best = (rank, n)
    assert best is not None, f"{module} is in no layer: add it to LAYERS"
    return best


def test_every_module_has_a_layer():
    for m in imports.modules():
        unit(m)


def test_no_import_circles():
    assert imports.cycles(imports.graph()) == []


def upward_imports(package_dir: Path = imports.PACKAGE_DIR) -> list[str]:
    bad = []
    for m in imports.modules(package_dir):
        rank, pkg = unit(m)
        for i in imports.imports_of(m, package_dir):
            t_rank, t_pkg = unit(i.target)
            same_package = t_pkg == pkg and pkg != "lmcore"
            if not (t_rank < rank or same_package):
                bad.append(f"{m}:{i.line} imports {i.target} (layer {t_rank} {t_pkg}, from layer {rank} {pkg})")
    return bad


def test_imports_go_down_the_layers_only():
    assert upward_imports() == []


def test_an_upward_or_sideways_import_and_a_circle_are_caught(tmp_path):
    pkg = tmp_path / "lmcore"
    shutil.copytree(imports.PACKAGE_DIR, pkg, ignore=shutil.ignore_patterns("__pycache__"))
    with open(pkg / "core" / "task_specs.py", "a", encoding="utf-8") as f:
        f.write("\nfrom lmcore.config import Params  # noqa\n")
    with open(pkg / "generate.py", "a", encoding="utf-8") as f:
        f.write("\nfrom lmcore.export import export  # noqa\n")
    try:
        bad = upward_imports(pkg)
        assert any(b.startswith("lmcore.core.task_specs:") and "lmcore.config" in b for b in bad), bad
        assert any(b.startswith("lmcore.generate:") and "lmcore.export" in b for b in bad), bad
        assert ["lmcore.config", "lmcore.core.task_specs"] in [
            [m for m in c if m in ("lmcore.config", "lmcore.core.task_specs")] for c in imports.cycles(imports.graph(pkg))]
    finally:
        imports.clear_cache()


def test_function_level_imports_give_a_reason():
    """Imports sit at the top of modules; one inside a function needs a ``# lazy: <reason>``
    comment: the stage wiring and the CLI load a stage's or a command's code only when it runs,
    and a heavy optional dependency (mlflow, matplotlib, scikit-learn, datasets...) is loaded by
    the code that needs it."""
    bad = [f"{m}:{line} imports {mod} inside a function without '# lazy: <reason>'"
           for m in imports.modules() for line, mod, reason in imports.function_level_imports(m) if not reason]
    assert bad == []


def test_a_function_level_import_without_a_reason_is_caught(tmp_path):
    pkg = tmp_path / "lmcore"
    shutil.copytree(imports.PACKAGE_DIR, pkg, ignore=shutil.ignore_patterns("__pycache__"))
    with open(pkg / "generate.py", "a", encoding="utf-8") as f:
        f.write("\n\ndef _planted():\n    import json\n\n\ndef _given():\n    import csv  # lazy: a reason\n")
    try:
        found = {mod: reason for _, mod, reason in imports.function_level_imports("lmcore.generate", pkg)}
        assert "json" in found and found["json"] is None
        assert found["csv"] and "a reason" in found["csv"]
    finally:
        imports.clear_cache()


def test_the_stage_wiring_loads_each_stage_from_its_entry_module():
    lazy = {i.target for i in imports.imports_of("lmcore.stages") if not i.top_level}
    assert lazy == set(ENTRY_MODULES.values())
    assert list(ENTRY_MODULES) == ORDER


def test_code_deps_are_the_import_closure_of_the_entry_module():
    evaluate = code_deps("evaluate")
    # what the evaluate stage runs besides its own module: its windows, bytes, baseline, tasks and
    # report, sampling, the model, model folders, token shards, the encode rules, the tokenizer, GLUE metrics
    for f in ("lmcore/eval/evaluate.py", "lmcore/eval/windows.py", "lmcore/eval/scored.py", "lmcore/eval/unigram.py",
              "lmcore/eval/tasks.py", "lmcore/eval/report.py", "lmcore/generate.py", "lmcore/model/decoder.py",
              "lmcore/model/folder.py", "lmcore/data/shards.py", "lmcore/data/encode.py", "lmcore/data/tokenizer.py",
              "lmcore/data/glue.py", "lmcore/config.py"):
        assert f in evaluate, f
    # the lazy imports of the wiring and the CLI are not followed (no stage runs every command)
    assert "lmcore/train/pretrain.py" not in evaluate and "lmcore/cli/generate.py" not in evaluate
    # what runs every stage (its wiring, the command line) is a dependency of each; what starts
    # launched processes, of the launched stages only
    for name in ORDER:
        assert {"lmcore/stages.py", "lmcore/cli/main.py", "lmcore/cli/__main__.py"} <= set(code_deps(name)), name
        assert ("lmcore/launch.py" in code_deps(name)) == (name in ("pretrain", "finetune")), name
    pretrain = code_deps("pretrain")
    for f in ("lmcore/train/accel.py", "lmcore/train/flops.py", "lmcore/model/folder.py", "lmcore/data/shards.py"):
        assert f in pretrain, f
    assert "lmcore/generate.py" not in code_deps("prepare")
    assert all(Path(imports.PACKAGE_DIR.parent / f).is_file() for name in ORDER for f in code_deps(name))


def test_an_edit_to_sampling_code_changes_the_cache_key_of_evaluate_only(tmp_path):
    """The Prefect cache key hashes the same closure that dvc.yaml lists."""
    pkg = tmp_path / "lmcore"
    shutil.copytree(imports.PACKAGE_DIR, pkg, ignore=shutil.ignore_patterns("__pycache__"))
    imports.clear_cache()
    before = {name: code_fingerprint(name, pkg) for name in ORDER}
    with open(pkg / "generate.py", "a", encoding="utf-8") as f:
        f.write("\n\ndef _edited() -> None:\n    pass\n")
    after = {name: code_fingerprint(name, pkg) for name in ORDER}
    changed = sorted(n for n in ORDER if before[n] != after[n])
    assert changed == ["evaluate"]
    imports.clear_cache()


@pytest.mark.parametrize("source, expected", [
    ("import lmcore.core.io\n", "lmcore.core.io"),
    ("from lmcore.core import io\n", "lmcore.core.io"),
    ("from lmcore.core.io import write_json\n", "lmcore.core.io"),
    ("from . import io\n", "lmcore.core.io"),
    ("def f():\n    from lmcore.core.io import write_json  # lazy: a test\n", "lmcore.core.io"),
])
def test_import_targets_are_resolved_to_modules(tmp_path, source, expected):
    shutil.copytree(imports.PACKAGE_DIR / "core", tmp_path / "lmcore" / "core")
    (tmp_path / "lmcore" / "__init__.py").write_text("")
    (tmp_path / "lmcore" / "core" / "probe.py").write_text(source)
    found = imports.imports_of("lmcore.core.probe", tmp_path / "lmcore")
    assert [i.target for i in found] == [expected]
    assert found[0].top_level == (not source.startswith("def"))
    assert found[0].reason == ("a test" if "lazy" in source else None)


def test_cycles_finds_a_circle():
    assert imports.cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert imports.cycles({"a": {"b"}, "b": set()}) == []


def test_the_cli_loads_neither_torch_nor_mlflow_before_a_command_needs_them():
    """Parsing a command line loads none of the heavy libraries: each command loads its own code
    when it runs, so ``lmcore --help`` takes 0.4 s, and the commands that only read MLflow
    (promote, lineage) and the launching process of ``lmcore launch`` never pay torch's 1.3 s
    (``lmcore promote``: 4.4 -> 2.9 s on a 2-core Zen 2)."""
    import subprocess
    import sys

    code = ("import sys, lmcore.cli.main as m; "
            "print(sorted(k for k in ('torch', 'mlflow', 'transformers', 'accelerate') if k in sys.modules))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert res.stdout.strip() == "[]", res.stdout
