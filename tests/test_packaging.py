"""The installed package is one `fedtune` namespace, and its layers only import downwards."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Lower layers never import higher ones; packages of the same layer never import each other.
LAYERS = {"common": 0, "client": 1, "server": 1, "report": 1, "simulations": 2, "cli": 3}


def _imported_layers(path: Path) -> list[tuple[int, str]]:
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                 else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level
                 else [])
        for name in names:
            parts = name.split(".")
            if parts[0] == "fedtune" and len(parts) > 1 and parts[1] in LAYERS:
                out.append((node.lineno, parts[1]))
    return out


def test_layers_import_only_downwards():
    bad = []
    for layer, rank in LAYERS.items():
        for path in sorted((ROOT / layer).rglob("*.py")):
            for line, target in _imported_layers(path):
                if target != layer and LAYERS[target] >= rank:
                    bad.append(f"{path.relative_to(ROOT)}:{line} imports fedtune.{target}")
    assert not bad, "imports that climb or cross a layer:\n" + "\n".join(bad)


def test_wheel_installs_only_the_fedtune_namespace(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation",
         "-q", "-w", str(tmp_path / "dist")],
        check=True, capture_output=True, timeout=300,
    )
    wheel = next((tmp_path / "dist").glob("fedtune-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"fedtune"}, tops
    for sub in ("cli", "common", "client", "server", "server/strategy", "report", "simulations"):
        assert f"fedtune/{sub}/__init__.py" in names
    assert not any(n.startswith(("fedtune/benchmarks", "fedtune/tests")) for n in names)

    target = tmp_path / "site"
    with zipfile.ZipFile(wheel) as z:
        z.extractall(target)
    probe = (
        "import importlib.util, fedtune.server, fedtune.cli.main;"
        "print(fedtune.server.__file__);"
        "print([m for m in ('common', 'client', 'server', 'simulations', 'cli', 'report')"
        " if importlib.util.find_spec(m) is not None])"
    )
    env = {**os.environ, "PYTHONPATH": str(target)}
    res = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    where, generic = res.stdout.strip().splitlines()
    assert Path(where).is_relative_to(target)
    assert generic == "[]"
