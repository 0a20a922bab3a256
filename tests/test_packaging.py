"""Packaging: one import package, the start-up hook, nothing generic at the top level, the same names everywhere.

The first tests look at the distribution installed in this environment. The others build fresh layouts (a
regular install, an editable install, a bare source checkout) in throw-away venvs and check each in a new
interpreter: ``pkgutil.walk_packages`` terminates and yields exactly the modules of the three source folders,
nothing else of the checkout is importable under ``nnunetv2_mamba``, and nnU-Net finds our trainers.
"""
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest

import nnunetv2_mamba


def installed_distribution():
    """Return the distribution installed in site-packages (not a build's egg-info in the checkout)."""
    found = [d for d in importlib.metadata.distributions(path=[sysconfig.get_paths()["purelib"]])
             if d.metadata["Name"] == "nnunetv2-mamba"]
    assert found, "nnunetv2-mamba is not installed in site-packages (pip install .)"
    return found[0]


def test_installed_files_live_under_the_nnunetv2_mamba_name():
    files = installed_distribution().files
    top_level = {f.parts[0] for f in files if not f.parts[0].startswith("..")}
    allowed_prefixes = ("nnunetv2_mamba", "__editable__", "__pycache__")
    unexpected = {name for name in top_level if not name.startswith(allowed_prefixes)}
    assert not unexpected, f"files outside the nnunetv2_mamba name in site-packages: {sorted(unexpected)}"
    assert "nnunetv2_mamba.pth" in top_level
    assert "trainers" not in top_level and "network_architectures" not in top_level


def test_subpackages_import_under_the_package_name():
    import nnunetv2_mamba.network_architectures as networks
    import nnunetv2_mamba.trainers.base as base

    assert networks.__name__ == "nnunetv2_mamba.network_architectures"
    assert base.nnUNetTrainerMambaBase.__module__ == "nnunetv2_mamba.trainers.base"
    assert installed_distribution().version == nnunetv2_mamba.__version__


def test_console_script_is_declared():
    entry_points = installed_distribution().entry_points
    assert any(ep.name == "nnunetv2_mamba" and ep.value == "nnunetv2_mamba.cli:main" for ep in entry_points)


# --- one package, the same names in every layout ----------------------------------------------------------------
# Each layout gets a fresh interpreter. Installs go into a throw-away venv that sees this environment's
# packages (torch, nnunetv2, setuptools, pip) through a filtered view of its site-packages: every entry except
# nnunetv2-mamba's own and the .pth files, so neither an installed copy nor its start-up hook leaks in.

SOURCE_FOLDERS = {"nnunetv2_mamba": "nnunetv2_mamba", "trainers": "nnunetv2_mamba.trainers",
                  "network_architectures": "nnunetv2_mamba.network_architectures"}
OWN_ENTRIES = ("nnunetv2_mamba", "nnunetv2-mamba", "__editable__", "__editable___nnunetv2_mamba")

CHECK = textwrap.dedent("""
    import sys
    state_at_startup = {"hook_ran": "nnunetv2_mamba" in sys.modules, "torch": "torch" in sys.modules}
    import importlib.util, json, os, pkgutil
    import nnunetv2_mamba

    def raise_error(name):
        raise RuntimeError(f"walk_packages could not import {name}")

    names = [info.name for info in pkgutil.walk_packages(nnunetv2_mamba.__path__, "nnunetv2_mamba.",
                                                         onerror=raise_error)]
    leaked = [name for name in ("nnunetv2_mamba.setup", "nnunetv2_mamba.tests", "nnunetv2_mamba.nnunetv2_mamba",
                                "nnunetv2_mamba.benchmarks", "nnunetv2_mamba.docs")
              if importlib.util.find_spec(name) is not None]
    found = {"trainer_module": None}
    if "--lookup" in sys.argv:  # nnU-Net's own lookup (imports nnU-Net's trainers: ~8 s of CPU)
        from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
        found["trainer_module"] = recursive_find_trainer_class_by_name("nnUNetTrainerUMambaBot").__module__
    print("RESULT", json.dumps({**state_at_startup, **found, "names": names, "leaked": leaked,
                                "package": nnunetv2_mamba.__file__,
                                "trainer_file": importlib.util.find_spec("nnunetv2_mamba.trainers.umamba").origin,
                                "network_file": importlib.util.find_spec(
                                    "nnunetv2_mamba.network_architectures.umamba").origin}))
""")


def checkout_root() -> Path:
    """Return the repository root this test file belongs to (the folder with setup.py)."""
    for folder in Path(__file__).resolve().parents:
        if (folder / "setup.py").is_file() and (folder / "trainers").is_dir():
            return folder
    raise AssertionError(f"no checkout root (setup.py + trainers/) above {__file__}")


def expected_module_names(root: Path) -> set:
    """Return the dotted names of every module and package of the three source folders, from the files."""
    names = set()
    for folder, package in SOURCE_FOLDERS.items():
        def collect(directory: Path, dotted: str):
            for entry in sorted(directory.iterdir()):
                if entry.suffix == ".py" and entry.name != "__init__.py":
                    names.add(f"{dotted}.{entry.stem}")
                elif entry.is_dir() and (entry / "__init__.py").is_file():
                    names.add(f"{dotted}.{entry.name}")
                    collect(entry, f"{dotted}.{entry.name}")
        if package != "nnunetv2_mamba":
            names.add(package)
        collect(root / folder, package)
    return names


def outer_site_view(target: Path) -> Path:
    """Return a folder of links to this environment's site-packages entries, without ours and without .pth."""
    target.mkdir()
    for site_dir in dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]):
        for entry in Path(site_dir).iterdir():
            if entry.name.startswith(OWN_ENTRIES) or entry.suffix == ".pth" or (target / entry.name).exists():
                continue
            (target / entry.name).symlink_to(entry)
    return target


def make_venv(path: Path, view: Path) -> Path:
    """Create an empty venv that sees ``view``; return its python."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True, timeout=120)
    python = path / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    site_dir = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                              check=True, capture_output=True, text=True).stdout.strip()
    Path(site_dir, "outer_site_view.pth").write_text(f"{view}\n")
    return python


def child_env(**extra) -> dict:
    """Environment for the child interpreters: none of this process's import paths or trainer folders."""
    env = {key: value for key, value in os.environ.items()
           if key not in ("PYTHONPATH", "nnUNet_extTrainer", "PYTHONHOME")}
    env.update(PYTHONNOUSERSITE="1", PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INDEX="1", **extra)
    return env


def pip_install(python: Path, source: Path, editable: bool):
    command = [str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation"]
    command += ["-e", str(source)] if editable else [str(source)]
    completed = subprocess.run(command, env=child_env(), cwd=source.parent, capture_output=True, text=True,
                               timeout=300)
    assert completed.returncode == 0, completed.stdout[-2000:] + completed.stderr[-3000:]


def start_check(python: Path, cwd: Path, lookup: bool = True, **env) -> subprocess.Popen:
    """Start the check in a fresh interpreter; ``lookup`` finds the trainer through nnU-Net's own lookup."""
    command = [str(python), "-c", CHECK] + (["--lookup"] if lookup else [])
    return subprocess.Popen(command, env=child_env(**env), cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def check_result(process: subprocess.Popen) -> dict:
    """Return the check's result, or {"error": ...} so that each layout's test reports its own failure."""
    stdout, stderr = process.communicate(timeout=300)
    lines = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
    if process.returncode != 0 or not lines:
        return {"error": f"exit code {process.returncode}\n{stdout[-1500:]}\n{stderr[-3000:]}"}
    return json.loads(lines[-1][len("RESULT "):])


def site_packages(python: Path) -> Path:
    return Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    """Copy the checkout, install it (regular, editable, not at all) and run the check in each layout.

    The checks run concurrently; three of them import all of nnunetv2's trainers for its lookup (about 8 s of CPU each).
    """
    base = tmp_path_factory.mktemp("layouts")
    source = base / "checkout"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build", "dist")
    root = checkout_root()
    source.mkdir()
    for name in ("setup.py", "README.md"):
        shutil.copy2(root / name, source / name)
    for name in (*SOURCE_FOLDERS, "tests", "benchmarks", "docs"):
        if (root / name).is_dir():
            shutil.copytree(root / name, source / name, ignore=ignore)
    # tests/ is a package in the checkout; make sure the copy has the same trap to fall into.
    (source / "tests" / "__init__.py").touch()
    view = outer_site_view(base / "site_view")
    neutral = base / "neutral_cwd"
    neutral.mkdir()
    pythons = {"bare": make_venv(base / "venv_bare", view)}
    for kind, editable in (("regular", False), ("editable", True)):
        pythons[kind] = make_venv(base / f"venv_{kind}", view)
        pip_install(pythons[kind], source, editable)
    # A regular build leaves build/ and *.egg-info in the source folder; the checks must not depend on them.
    for leftover in [source / "build", *source.glob("*.egg-info")]:
        shutil.rmtree(leftover, ignore_errors=True)
    processes = {
        "regular": start_check(pythons["regular"], neutral),
        # The same installed copy as "regular" (its start-up hook imports it first): no second nnU-Net lookup.
        "regular_from_root": start_check(pythons["regular"], source, lookup=False),
        "editable": start_check(pythons["editable"], neutral),
        "checkout": start_check(pythons["bare"], neutral, PYTHONPATH=str(source)),
    }
    try:
        results = {name: check_result(process) for name, process in processes.items()}
    finally:
        for process in processes.values():
            if process.poll() is None:
                process.kill()
                process.wait()
    return {"source": source, "pythons": pythons, "results": results,
            "expected": expected_module_names(source)}


def assert_one_clean_package(result: dict, expected: set, lookup: bool = True) -> Path:
    """Assert the walk, the leaks, the trainer lookup and the start-up cost; return the folder the code came from."""
    assert "error" not in result, result.get("error")
    names = result["names"]
    assert len(names) == len(set(names)), "walk_packages yielded a module twice"
    assert set(names) == expected, (f"missing: {sorted(expected - set(names))}; "
                                    f"unexpected: {sorted(set(names) - expected)}")
    assert result["leaked"] == [], f"checkout files importable under nnunetv2_mamba: {result['leaked']}"
    if lookup:
        assert result["trainer_module"] == "nnunetv2_mamba.trainers.umamba", "nnU-Net's lookup found another class"
    assert not result["torch"], "the start-up hook imported torch"
    package_dir = Path(result["package"]).resolve().parent
    installed = (package_dir / "trainers").is_dir()
    # One copy of the code: the installed package holds all three folders; a checkout has them side by side.
    code_root = package_dir if installed else package_dir.parent
    assert Path(result["trainer_file"]).resolve() == code_root / "trainers" / "umamba.py", result
    assert Path(result["network_file"]).resolve() == code_root / "network_architectures" / "umamba.py", result
    return package_dir


def test_regular_install_is_one_package_seen_from_a_neutral_folder(layouts):
    python = layouts["pythons"]["regular"]
    result = layouts["results"]["regular"]
    assert result["hook_ran"], "the nnunetv2_mamba.pth start-up hook did not run"
    installed = site_packages(python).resolve()
    assert assert_one_clean_package(result, layouts["expected"]) == installed / "nnunetv2_mamba"
    top_level = {entry.name for entry in installed.iterdir()} - {"outer_site_view.pth", "__pycache__"}
    assert {name for name in top_level if not name.startswith("nnunetv2_mamba")} == set(), top_level


def test_regular_install_run_from_the_checkout_root_imports_the_same_names(layouts):
    # The CI case: pip install ".[test]", then pytest from the checkout root, which is then on sys.path. The
    # start-up hook has imported the installed copy before the root is added, so that copy is used; either
    # way, all three folders must come from one copy.
    result = layouts["results"]["regular_from_root"]
    assert result["hook_ran"]
    package_dir = assert_one_clean_package(result, layouts["expected"], lookup=False)
    assert package_dir in (site_packages(layouts["pythons"]["regular"]).resolve() / "nnunetv2_mamba",
                           layouts["source"].resolve() / "nnunetv2_mamba")


def test_editable_install_is_one_package_seen_from_a_neutral_folder(layouts):
    python = layouts["pythons"]["editable"]
    result = layouts["results"]["editable"]
    assert result["hook_ran"], "the editable install's nnunetv2_mamba.pth start-up hook did not run"
    assert assert_one_clean_package(result, layouts["expected"]) == layouts["source"].resolve() / "nnunetv2_mamba"
    generic = {"trainers", "network_architectures", "tests", "setup.py"} & {
        entry.name for entry in site_packages(python).iterdir()}
    assert not generic, generic


def test_source_checkout_without_install_imports_the_same_names(layouts):
    result = layouts["results"]["checkout"]
    assert not result["hook_ran"], "nothing is installed in this venv, yet a start-up hook ran"
    assert assert_one_clean_package(result, layouts["expected"]) == layouts["source"].resolve() / "nnunetv2_mamba"
