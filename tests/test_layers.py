"""The package's layers: the algorithm core loads no platform library, and no layer imports one above it."""
import ast
import subprocess
import sys
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "cepdist"
# lowest first; a module may import its own layer and those below it
RANK = {"config": 0, "core": 1, "data": 2, "envs": 3, "algos": 4, "distributed": 5, "analysis": 5, "cli": 6,
        "__main__": 6}


def layer_of(module: str) -> str:
    return module.split(".")[1] if "." in module else "__init__"


def imports(path: Path) -> set[str]:
    """Absolute cepdist modules a file imports (relative imports resolved)."""
    mod = ".".join(path.relative_to(PKG.parent).with_suffix("").parts)
    pkg = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("cepdist"):
                out.add(target)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("cepdist"))
    return out


def test_no_layer_imports_an_upper_one():
    bad = []
    for f in PKG.rglob("*.py"):
        rel = f.relative_to(PKG)
        here = rel.parts[0].removesuffix(".py")
        if here == "__init__":
            continue
        for target in imports(f):
            there = layer_of(target)
            if there in RANK and RANK[there] > RANK[here]:
                bad.append(f"{rel} imports {target}")
            if here == "analysis" and there == "distributed" or here == "distributed" and there == "analysis":
                bad.append(f"{rel} imports {target} (analysis and the Ray layer are independent)")
    assert not bad, "\n".join(bad)


def test_every_module_is_in_a_layer():
    for f in PKG.rglob("*.py"):
        top = f.relative_to(PKG).parts[0].removesuffix(".py")
        assert top in RANK or top == "__init__", f


def test_the_core_loads_no_platform_library():
    code = ("import sys, cepdist.core.diffusion, cepdist.core.nets, cepdist.core.solver, cepdist.core.guidance, "
            "cepdist.core.qlearning; "
            "bad = [m for m in ('ray', 'mlflow', 'gymnasium', 'h5py', 'pyarrow', 'pandas', 'yaml', 'mujoco') "
            "if m in sys.modules]; print(','.join(bad))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "", f"the core loaded {r.stdout.strip()}"


def test_the_core_does_no_file_io():
    banned = {"os", "pathlib", "shutil", "io", "h5py", "json", "pickle", "tempfile"}
    for f in (PKG / "core").glob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level else []
            assert not {n.split(".")[0] for n in names} & banned, f"{f.name} imports {names}"
