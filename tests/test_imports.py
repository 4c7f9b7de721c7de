"""What each command imports (in a fresh interpreter), and a package import graph without circles.

The CPU commands must not import torch (over a second per process, far more on a cluster's
shared filesystem); `--help` must not even import numpy.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
import torch
from safetensors.torch import save_file

from smcli.checkpoint import ModelConfig, PoolConfig, build_module, save_checkpoint
from tests.conftest import PATCH, tricky_coords

PACKAGE = Path(__file__).resolve().parent.parent / "smcli"
IN_DIM = 12

# Runs the CLI's main() with the given arguments, then reports which heavy modules got imported.
PROBE = """
import json, sys
sys.argv = ["smcli", *json.loads(sys.argv[1])]
from smcli.cli import main
try:
    main()
    code = 0
except SystemExit as stop:
    code = stop.code
loaded = {name: name in sys.modules for name in ("torch", "numpy", "scipy", "pyarrow")}
print("PROBE " + json.dumps({"code": code, **loaded}))
"""


def probe(*args: str, cwd: Path) -> dict:
    env = {"PATH": "/usr/bin:/bin", "HOME": str(cwd)}  # no SMCLI_PROBE_CUDA, no inherited flags
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, json.dumps([str(a) for a in args])],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=120,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("PROBE ")]
    assert lines, proc.stderr
    return json.loads(lines[-1][len("PROBE ") :])


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("imports")
    coords = tricky_coords(4)
    features = torch.randn(len(coords), IN_DIM, generator=torch.Generator().manual_seed(0))
    bag = root / "bag.safetensors"
    save_file(
        {"features": features.to(torch.bfloat16), "coords": torch.from_numpy(coords)},
        str(bag),
        metadata={"patch_size": str(PATCH)},
    )
    model = root / "model.safetensors"
    for mode in ("approx", "exact"):
        config = ModelConfig(PoolConfig(IN_DIM, 4, sm_mode=mode), head=True)
        save_checkpoint(build_module(config).state_dict(), config, root / f"{mode}.safetensors")
    model = root / "approx.safetensors"
    return {"root": root, "bag": bag, "model": model, "exact": root / "exact.safetensors"}


@pytest.mark.parametrize("model", ["model", "exact"])
def test_cpu_scoring_never_imports_torch(files, model):
    root = files["root"]
    report = probe(
        "score", files["bag"], "-m", files[model], "-o", root / f"{model}.csv", "--device", "cpu", cwd=root
    )
    assert report["code"] == 0 and not report["torch"]
    assert (root / f"{model}.csv").read_text().startswith("bag_id,instance")


@pytest.mark.skipif(Path("/proc/driver/nvidia/version").exists(), reason="a machine with an NVIDIA driver")
def test_auto_device_without_an_nvidia_driver_never_imports_torch(files):
    root = files["root"]
    report = probe("score", files["bag"], "-m", files["model"], "-o", root / "auto.csv", cwd=root)
    assert report["code"] == 0 and not report["torch"]


def test_inspect_heatmap_geojson_and_convert_bag_never_import_torch(files):
    root = files["root"]
    for args in (
        ("inspect", files["bag"], files["model"]),
        ("inspect", files["bag"], "-m", files["model"], "--json"),
        ("heatmap", files["bag"], "-m", files["model"], "-o", root / "map.png"),
        ("geojson", files["bag"], "-m", files["model"], "-o", root / "tiles.geojson"),
        ("convert-bag", files["bag"], "-o", root / "copy.safetensors", "--overwrite"),
    ):
        report = probe(*args, cwd=root)
        assert report["code"] == 0 and not report["torch"], args


def test_help_and_version_import_neither_numpy_nor_torch(files):
    for args in (("--help",), ("--version",), ("score", "--help"), ()):
        report = probe(*args, cwd=files["root"])
        assert not report["torch"] and not report["numpy"], args


def test_bfloat16_bags_are_decoded_exactly(files):
    """numpy has no bfloat16: smcli decodes the bits by hand; the values must be torch's, exactly."""
    from smcli.bags import load_bag
    from smcli.tensorfile import decode_bfloat16

    bag = load_bag(files["bag"])
    coords = tricky_coords(4)
    expected = torch.randn(len(coords), IN_DIM, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    assert bag.features_dtype == "bfloat16" and bag.features.dtype == np.float32
    assert np.array_equal(bag.features, expected.float().numpy())
    # every bit pattern, specials included (inf, nan, subnormals, -0)
    patterns = np.arange(2**16, dtype=np.uint16)
    ours = decode_bfloat16(patterns)
    theirs = torch.from_numpy(patterns.view(np.int16)).view(torch.bfloat16).float().numpy()
    assert np.array_equal(ours.view(np.uint32), theirs.view(np.uint32))


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
def test_other_feature_dtypes_are_kept_as_stored(tmp_path, dtype):
    from smcli.bags import load_bag

    coords = tricky_coords(1)
    features = torch.randn(len(coords), IN_DIM, dtype=torch.float64).to(dtype)
    path = tmp_path / "bag.safetensors"
    save_file({"features": features, "coords": torch.from_numpy(coords)}, str(path))
    bag = load_bag(path)
    assert bag.features_dtype == str(dtype).removeprefix("torch.")
    assert np.array_equal(bag.features, features.numpy())


# ---------------------------------------------------------------------------------------------
# the import graph


def smcli_imports(path: Path) -> set[str]:
    """smcli modules a source file imports, at any depth of the file (lazy imports count too)."""
    tree = ast.parse(path.read_text())
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.split(".")[0] == "smcli")
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.split(".")[0] != "smcli":
                continue
            for alias in node.names:  # `from smcli import bags` names a module, `import X` a name
                candidate = f"{node.module}.{alias.name}"
                found.add(candidate if module_path(candidate) is not None else node.module)
    return found


def module_path(name: str) -> Path | None:
    relative = Path(*name.split(".")[1:])
    for path in (PACKAGE / relative.with_suffix(".py"), PACKAGE / relative / "__init__.py"):
        if path.is_file():
            return path
    return None


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    graph = {module_name(path): set() for path in PACKAGE.rglob("*.py")}
    for path in PACKAGE.rglob("*.py"):
        name = module_name(path)
        graph[name] = {target for target in smcli_imports(path) if target != name and target in graph}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the directed graph as a list of nodes, or None (depth-first search)."""
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                return stack[stack.index(target) :] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_the_package_import_graph_has_no_cycles():
    graph = import_graph()
    assert {"smcli.cli", "smcli.model", "smcli.bags"} <= set(graph)
    assert graph["smcli.cli"], "the parser found no imports at all"
    cycle = find_cycle(graph)
    assert cycle is None, " -> ".join(cycle or [])
