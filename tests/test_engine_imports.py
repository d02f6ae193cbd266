"""The engine's imports run one way and load only what is used.

Each check runs in a fresh interpreter, so modules other tests imported cannot hide a load.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# The graph-building, compiling and running stack: nothing that only reads files or parses a
# command line should load any of it.
COMPUTE_STACK = (
    "engine.graph",
    "engine.opr",
    "engine.autodiff",
    "engine.compiler",
    "engine.runtime",
    "engine.model",
    "engine.models",
    "engine.loss",
    "engine.optimizer",
    "engine.nn",
    "engine.trainer",
    "engine.onnx",
    "engine.serialize.modelfile",
)


def engine_modules_after(code: str) -> list[str]:
    """The engine modules in sys.modules after a fresh interpreter ran `code`."""
    report = "import json, sys\nprint(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] == 'engine')))"
    probe = f"{code}\n{report}"
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


def in_stack(module: str) -> bool:
    return any(module == m or module.startswith(m + ".") for m in COMPUTE_STACK)


def test_import_engine_loads_only_the_package():
    assert engine_modules_after("import engine") == ["engine"]


def test_data_readers_load_no_compute_stack():
    loaded = engine_modules_after("import engine.data.idx")
    assert "engine.data.idx" in loaded
    assert all(m == "engine" or m.startswith("engine.data") for m in loaded), loaded


def test_graph_layer_loads_no_operator():
    """graph.py is the bottom layer: it imports nothing above it (arithmetic comes from opr)."""
    assert engine_modules_after("import engine.graph") == ["engine", "engine.graph"]


def test_device_agent_main_loads_no_compute_stack():
    loaded = engine_modules_after("import device_agent.__main__")
    assert not [m for m in loaded if in_stack(m)], loaded


def test_pf_agent_help_loads_no_compute_stack():
    """`pf-agent --help` (python -m device_agent --help) prints usage without the engine's compute stack."""
    code = (
        "import runpy, sys\n"
        "sys.argv = ['pf-agent', '--help']\n"
        "try:\n"
        "    runpy.run_module('device_agent', run_name='__main__', alter_sys=True)\n"
        "except SystemExit as exc:\n"
        "    assert exc.code in (0, None), exc.code\n"
    )
    loaded = engine_modules_after(code)
    assert not [m for m in loaded if in_stack(m)], loaded


def test_public_names_resolve_lazily_and_completely():
    code = (
        "import engine\n"
        "missing = [n for n in engine.__all__ if getattr(engine, n, None) is None]\n"
        "assert not missing, missing\n"
        "g = engine.ComputingGraph()\n"
        "assert float(g.constant(2.0).value) == 2.0  # the operator layer came with the graph\n"
    )
    loaded = engine_modules_after(code)
    assert "engine.opr" in loaded and "engine.serialize.modelfile" in loaded
    # the runtime and ONNX support still wait for a compile or an .onnx file
    assert not [m for m in loaded if m.startswith(("engine.runtime", "engine.compiler", "engine.onnx"))], loaded


def test_unknown_engine_attribute_is_an_attribute_error():
    import engine

    with pytest.raises(AttributeError, match="no_such_name"):
        engine.no_such_name  # noqa: B018


def test_operator_namespace_exports_operators_and_functions_only():
    from engine import opr
    from engine.opr.base import Operator

    assert not hasattr(opr, "np") and not hasattr(opr, "Any")
    for name in opr.__all__:
        value = getattr(opr, name)
        is_operator = isinstance(value, type) and issubclass(value, Operator)
        is_function = name.islower() and callable(value) and value.__module__ == "engine.opr.functional"
        assert is_operator or is_function, name
    public = {n for n in dir(opr) if not n.startswith("_")}
    submodules = {n for n in public if type(getattr(opr, n)).__name__ == "module"}
    assert public - submodules == set(opr.__all__)


def test_engine_layers_contract_holds():
    """pyproject.toml's "engine layers" import contract (what `lint-imports` checks)."""
    run = "from importlinter.cli import lint_imports_command; lint_imports_command()"
    options = ["--contract", "engine-layers", "--no-cache", "--no-logo", str(ROOT / "pyproject.toml")]
    done = subprocess.run(
        [sys.executable, "-c", run, *options],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "engine layers KEPT" in done.stdout
