"""The three layers import one way only (STYLE.md 1): dsray/model <- dsray/parallel <- dsray/runtime.

Checked on the source (every import statement of every file, function-level and TYPE_CHECKING ones
included, plus the module-level imports of the dsray modules they reach, such as dsray.config), and at
run time (`import dsray.model` leaves ray and torch.distributed's process groups out of sys.modules).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FORBIDDEN = {
    "dsray/model": ("ray", "torch.distributed", "dsray.parallel", "dsray.runtime"),
    "dsray/parallel": ("ray", "dsray.runtime"),
}


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, root: Path, top_level_only: bool = False) -> list[tuple[int, str]]:
    """(line, module) for each import in the file; `from a import b` yields a and a.b (b may be a module);
    relative imports are resolved; importlib.import_module("x") / __import__("x") with a literal count too."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module_name(path, root).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    nodes = tree.body if top_level_only else ast.walk(tree)
    out: list[tuple[int, str]] = []
    for node in nodes:
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package[:len(package) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            out.append((node.lineno, base))
            out += [(node.lineno, f"{base}.{a.name}") for a in node.names if a.name != "*"]
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and ((isinstance(node.func, ast.Name) and node.func.id == "__import__")
                   or (isinstance(node.func, ast.Attribute) and node.func.attr == "import_module"))):
            out.append((node.lineno, node.args[0].value))
    return out


def module_file(name: str, root: Path) -> Path | None:
    base = root.joinpath(*name.split("."))
    for p in (base.with_suffix(".py"), base / "__init__.py"):
        if p.is_file():
            return p
    return None


def layer_violations(layer: str, forbidden: tuple[str, ...], root: Path = ROOT) -> list[str]:
    """'file:line imports module' for every forbidden import reachable from the layer's files."""
    bad = lambda m: any(m == f or m.startswith(f + ".") for f in forbidden)  # noqa: E731
    own = module_name(root / layer / "__init__.py", root)
    todo = [(p, False) for p in sorted((root / layer).rglob("*.py"))]
    todo.append((root / own.split(".")[0] / "__init__.py", True))  # the top package runs first
    seen: set[Path] = set()
    found = []
    while todo:
        path, top_only = todo.pop()
        if path in seen or not path.is_file():
            continue
        seen.add(path)
        for line, mod in imported_modules(path, root, top_only):
            if bad(mod):
                found.append(f"{path.relative_to(root)}:{line} imports {mod}")
                continue
            # Follow the package's other modules (dsray.config, dsray.checkpoint, ...): what they import at
            # module level comes along with the layer.
            if mod.split(".")[0] == own.split(".")[0] and not (mod == own or mod.startswith(own + ".")):
                f = module_file(mod, root)
                if f is not None:
                    todo.append((f, True))
    return sorted(set(found))


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_layers_import_one_way(layer):
    assert (ROOT / layer / "__init__.py").is_file()
    assert layer_violations(layer, FORBIDDEN[layer]) == []


def test_layer_check_catches_each_form(tmp_path):
    """The checker itself fails on each way of writing a forbidden import (so the test above can fail)."""
    pkg = tmp_path / "dsray"
    (pkg / "model").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from dsray.config import X\n\ndef f():\n    import dsray.runtime\n")
    (pkg / "config.py").write_text("import json\n")
    (pkg / "model" / "__init__.py").write_text("")
    assert layer_violations("dsray/model", FORBIDDEN["dsray/model"], tmp_path) == []  # lazy in dsray/__init__
    forms = ["import ray", "import ray.util.queue as q", "from ray import remote", "import torch.distributed as dist",
             "from torch import distributed", "from torch.distributed import all_reduce", "from dsray import parallel",
             "from dsray.runtime.engine import Engine", "from ..parallel import ep", "from .. import runtime",
             "def f():\n    import ray", "if TYPE_CHECKING:\n    from dsray.parallel import ep",
             "import importlib\nimportlib.import_module('ray')", "__import__('torch.distributed')",
             "from dsray import config"]  # the last one: via dsray/config.py
    for form in forms:
        (pkg / "config.py").write_text("import json\n" if "config" not in form else "import ray\n")
        (pkg / "model" / "a.py").write_text(form + "\n")
        assert layer_violations("dsray/model", FORBIDDEN["dsray/model"], tmp_path), form
    (pkg / "model" / "a.py").write_text("import torch\nfrom torch import nn\nfrom . import b\nimport raylib\n")
    (pkg / "config.py").write_text("import json\n")
    assert layer_violations("dsray/model", FORBIDDEN["dsray/model"], tmp_path) == []


def test_import_model_does_not_import_ray():
    # `import torch` itself loads torch.distributed (c10d included), so at run time the model may only add
    # none of it; the source check above is the strict one.
    code = ("import sys, torch; before = set(sys.modules); import dsray.model, dsray.config, dsray.checkpoint; "
            "bad = [m for m in sys.modules if m == 'ray' or m.startswith(('ray.', 'dsray.parallel', 'dsray.runtime'))"
            " or (m.startswith('torch.distributed') and m not in before)]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
