"""The architecture rules of DESIGN.md, checked."""

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def module_names():
    for top in (ROOT / "platform", ROOT):
        for p in top.iterdir():
            if p.name.startswith(".") or p.name in ("tests", "build", "dist"):
                continue
            if p.is_dir() and (p / "__init__.py").exists():
                yield p.name
            elif p.suffix == ".py":
                yield p.stem


def test_no_module_shadows_the_standard_library():
    clashes = sorted(set(module_names()) & set(sys.stdlib_module_names))
    assert clashes == []


def test_platform_never_imports_methods_or_pipelines():
    offenders = []
    for path in (ROOT / "platform" / "dynlab").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            offenders += [f"{path.name}: {n}" for n in names if n.split(".")[0] in ("methods", "pipelines")]
    assert offenders == []


def test_cluster_yaml_is_a_valid_ray_cluster_launcher_config():
    import yaml
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    validate_config(prepare_config(cfg))  # Ray's own schema; raises on a bad field
    head = " ".join(cfg["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head and "0.0.0.0" not in head  # nothing on a public address
    assert "RAY_AUTH_MODE=token" in " ".join(cfg["setup_commands"])  # sourced before every `ray start` (tests/test_cluster_yaml.py runs them)
