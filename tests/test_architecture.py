"""The architecture as a test: the README's import rules (Layout), read from every import statement.

- kernels/ import nothing of sftplug (torch, triton and each other only);
- a kernel takes from the other kernels/ modules only kernels/runtime.py's public names; the
  compile report, which compiles every kernel, imports their modules and reads only their
  public names; no kernels/ module reads another's private (underscore) names;
- plugins/ never import the CLI;
- the core (sftplug/) never imports a built-in plugin: only the registry names the list of them;
- the model (sftplug/model/) imports nothing of sftplug/hf/: HF files are read and written about
  the model, from above it;
- the model's parts (config, norms, RoPE, mixers, feed-forwards) never import the decoder that
  assembles them (sftplug/model/transformer.py).

Imports inside functions count too: they are read with ``ast``, not by importing.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Where each installed package lives in the repository (sftplug/plugins and sftplug/kernels link there).
FOLDERS = {"sftplug": ROOT / "sftplug", "sftplug.plugins": ROOT / "plugins", "sftplug.kernels": ROOT / "kernels"}


def module_name(path: Path) -> str:
    for package, folder in sorted(FOLDERS.items(), key=lambda item: -len(item[0])):
        if path.is_relative_to(folder):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            return ".".join([package, *parts])
    raise AssertionError(path)


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in the file, relative ones resolved."""
    tree = ast.parse(path.read_text(), filename=str(path))
    here = module_name(path).split(".")
    is_package = path.name == "__init__.py"
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here if is_package else here[:-1]
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module
            found.append((node.lineno, module))
            # `from sftplug import cli` imports the module sftplug.cli
            found += [(node.lineno, f"{module}.{alias.name}") for alias in node.names]
    return found


def files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*.py") if "__pycache__" not in p.parts)


def within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def violations(folder: Path, forbidden) -> list[str]:
    return [
        f"{path.relative_to(ROOT)}:{line} imports {module}"
        for path in files(folder)
        for line, module in imports(path)
        if forbidden(path, module)
    ]


def test_the_rules_are_read_from_real_imports():
    # the reader itself: a relative import, an import inside a function, `from package import module`
    found = {m for _, m in imports(ROOT / "sftplug" / "registry.py")}
    assert "sftplug.plugins.builtin" in found and "sftplug.hookspecs" in found
    assert module_name(ROOT / "plugins" / "sdpa.py") == "sftplug.plugins.sdpa"
    assert module_name(ROOT / "sftplug" / "attention" / "__init__.py") == "sftplug.attention"
    assert len(files(ROOT / "sftplug")) > 30 and files(ROOT / "kernels") and files(ROOT / "plugins")


def test_kernels_import_nothing_of_sftplug():
    def forbidden(path, module):
        return within(module, "sftplug") and not within(module, "sftplug.kernels")

    assert violations(FOLDERS["sftplug.kernels"], forbidden) == []


def kernel_names_used(path: Path) -> list[tuple[int, str]]:
    """(line, name) of every kernels/ module a kernels/ file imports and every name it takes from
    one, imported (``from sftplug.kernels.runtime import on_device``) or read off the module
    (``attention.kernel_of``): ``sftplug.kernels.MODULE`` or ``sftplug.kernels.MODULE.NAME``."""
    here = module_name(path)
    tree = ast.parse(path.read_text(), filename=str(path))
    bound = {}  # local name -> the module or name it stands for
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                local = alias.asname or alias.name.split(".")[0]  # `import a.b` binds a
                bound[local] = alias.name if alias.asname else local
                found.append((node.lineno, alias.name))
        elif isinstance(node, ast.ImportFrom):
            base = here.split(".")[: -node.level] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            for alias in node.names:
                bound[alias.asname or alias.name] = f"{module}.{alias.name}"
                found.append((node.lineno, f"{module}.{alias.name}"))
    for node in ast.walk(tree):  # attention.kernel_of, sftplug.kernels.attention.kernel_of
        chain, root = [], node
        while isinstance(root, ast.Attribute):
            chain.insert(0, root.attr)
            root = root.value
        if chain and isinstance(root, ast.Name) and root.id in bound:
            found.append((node.lineno, ".".join([bound[root.id], *chain])))
    names = {(line, ".".join(name.split(".")[:4])) for line, name in found}
    return sorted((line, name) for line, name in names
                  if within(name, "sftplug.kernels") and name != "sftplug.kernels" and not within(name, here))


def test_kernels_share_only_the_runtime_and_public_names():
    runtime, report = "sftplug.kernels.runtime", FOLDERS["sftplug.kernels"] / "compile_report.py"
    used = {path: kernel_names_used(path) for path in files(FOLDERS["sftplug.kernels"])}
    # the reader sees both forms: a name imported from the runtime, a name read off a kernel module
    assert f"{runtime}.sm_count" in {name for _, name in used[FOLDERS["sftplug.kernels"] / "rms_norm.py"]}
    assert "sftplug.kernels.attention.kernel_of" in {name for _, name in used[report]}

    def forbidden(path, name):
        private = any(part.startswith("_") for part in name.split(".")[2:])
        # the compile report compiles every kernel: it alone imports kernel modules
        return private or (path != report and not within(name, runtime))

    bad = [f"{path.relative_to(ROOT)}:{line} uses {name}" for path, names in used.items() for line, name in names
           if forbidden(path, name)]
    assert bad == []


def test_every_triton_kernel_module_imports_the_runtime():
    runtime = FOLDERS["sftplug.kernels"] / "runtime.py"
    kernel_modules = [path for path in files(FOLDERS["sftplug.kernels"])
                      if path != runtime and re.search(r"^\s*@triton\.jit", path.read_text(), re.MULTILINE)]
    assert len(kernel_modules) >= 5
    missing = [path.name for path in kernel_modules
               if not any(within(module, "sftplug.kernels.runtime") for _, module in imports(path))]
    assert missing == []


def test_plugins_never_import_the_cli():
    assert violations(FOLDERS["sftplug.plugins"], lambda path, module: within(module, "sftplug.cli")) == []


def test_the_core_reaches_built_in_plugins_only_through_the_registry():
    registry = FOLDERS["sftplug"] / "registry.py"

    def forbidden(path, module):
        if not within(module, "sftplug.plugins"):
            return False
        # the registry reads the list of built-ins (sftplug.plugins.builtin), nothing else
        return not (path == registry and within(module, "sftplug.plugins.builtin"))

    assert violations(FOLDERS["sftplug"], forbidden) == []


def test_the_model_imports_nothing_of_hf():
    assert violations(FOLDERS["sftplug"] / "model", lambda path, module: within(module, "sftplug.hf")) == []


def test_the_model_parts_never_import_the_decoder_that_assembles_them():
    parts = ["config", "norm", "rope", "attention", "feed_forward", "experts", "gated_deltanet"]

    def forbidden(path, module):
        return path.stem in parts and within(module, "sftplug.model.transformer")

    assert all((FOLDERS["sftplug"] / "model" / f"{part}.py").is_file() for part in parts)
    assert violations(FOLDERS["sftplug"] / "model", forbidden) == []


SUBPACKAGES = sorted(p.name for p in (ROOT / "sftplug").iterdir() if (p / "__init__.py").is_file())


@pytest.mark.parametrize("package", SUBPACKAGES)
def test_tests_mirror_the_tree(package):
    assert (ROOT / "tests" / package).is_dir(), f"sftplug/{package}/ has no tests/{package}/"


@pytest.mark.parametrize("package", ["sftplug.plugins", "sftplug.kernels"])
def test_top_level_folders_install_under_sftplug_and_hide_no_package(package):
    folder = FOLDERS[package]
    # without __init__.py the folder is at most a namespace portion, which never hides an
    # installed package of its name (PyPI's `kernels`) when the repo root is on sys.path
    assert not (folder / "__init__.py").exists()
    link = ROOT / Path(*package.split("."))
    assert link.is_symlink() and link.resolve() == folder.resolve()


LOWER_ROOMS = ["model", "hf", "data", "attention", "fused", "linear_attention"]
UPPER_ROOMS = ["sftplug.loading", "sftplug.registry", "sftplug.train", "sftplug.checkpoint", "sftplug.cli",
               "sftplug.diagnostics"]


@pytest.mark.parametrize("room", LOWER_ROOMS)
def test_no_import_runs_from_a_lower_room_back_up(room):
    # the rooms a run is built from never import what assembles the run from them
    def forbidden(path, module):
        return any(within(module, upper) for upper in UPPER_ROOMS)

    assert violations(FOLDERS["sftplug"] / room, forbidden) == []


def test_modules_stay_small_outside_kernels():
    # kernels follow the Triton tutorials' one-file-per-kernel form; everything else splits by job
    long = [f"{p.relative_to(ROOT)}: {n} lines" for folder in (FOLDERS["sftplug"], FOLDERS["sftplug.plugins"])
            for p in files(folder) if (n := len(p.read_text().splitlines())) > 400]
    assert long == []
