"""Trainer discovery: the start-up hook, nnU-Net's lookup in fresh and spawned processes, error isolation."""
import multiprocessing
import os
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest

from nnunetv2_mamba import registration
from nnunetv2_mamba.registration import EXT_TRAINER_ENV_VAR, TRAINER_SEARCH_DIR, register_trainer_path
from nnunetv2_mamba.trainers import discovery

LOOKUP = textwrap.dedent("""
    import sys
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name as find
    for name in sys.argv[1:]:
        cls = find(name)
        print("FOUND", name, cls.__module__)
""")


def clean_env(**extra):
    env = {k: v for k, v in os.environ.items() if k != EXT_TRAINER_ENV_VAR}
    env.update(extra)
    return env


def run_lookup(names, env):
    completed = subprocess.run([sys.executable, "-c", LOOKUP, *names], env=env, capture_output=True, text=True,
                               timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    return {line.split()[1]: line.split()[2] for line in completed.stdout.splitlines() if line.startswith("FOUND")}


def test_register_keeps_user_folders_first_and_is_idempotent():
    environ = {}
    assert register_trainer_path(environ)
    assert environ[EXT_TRAINER_ENV_VAR] == TRAINER_SEARCH_DIR
    environ = {EXT_TRAINER_ENV_VAR: os.pathsep.join(["/user/a", "/user/b"])}
    assert register_trainer_path(environ)
    assert environ[EXT_TRAINER_ENV_VAR].split(os.pathsep) == ["/user/a", "/user/b", TRAINER_SEARCH_DIR]
    assert not register_trainer_path(environ)
    assert environ[EXT_TRAINER_ENV_VAR].split(os.pathsep).count(TRAINER_SEARCH_DIR) == 1


def test_startup_hook_sets_variable_in_a_fresh_interpreter():
    code = "import os, sys; print(os.environ.get('nnUNet_extTrainer')); print('nnunetv2_mamba' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], env=clean_env(), capture_output=True, text=True,
                         check=True).stdout.split()
    # The hook registers the installed copy's folder (this test process may import the source checkout).
    folder = Path(out[0])
    assert folder.parts[-2:] == ("nnunetv2_mamba", "ext_trainers")
    assert (folder / "nnunetv2_mamba_trainers.py").is_file()
    assert out[1] == "True"
    # The hook is light: it must not import torch at every interpreter start.
    code = "import sys; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], env=clean_env(), capture_output=True, text=True,
                          check=True).stdout.strip() == "False"


def test_installed_hook_file_is_harmless_when_the_package_is_gone():
    hook = Path(sysconfig.get_paths()["purelib"]) / "nnunetv2_mamba.pth"
    assert hook.exists(), "pip install must place nnunetv2_mamba.pth in site-packages"
    line = hook.read_text().strip()
    assert line.startswith("import ")  # site.py executes only lines starting with 'import'
    code = ("import sys; sys.modules['nnunetv2_mamba'] = None\n" + line +
            "\nimport os; print(os.environ.get('nnUNet_extTrainer'))")
    completed = subprocess.run([sys.executable, "-S", "-c", code], env=clean_env(), capture_output=True, text=True)
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.strip() == "None"


def test_nnunet_finds_plugin_trainers_and_its_own_in_a_fresh_process(tmp_path):
    user_dir = tmp_path / "my_trainers"
    user_dir.mkdir()
    (user_dir / "my_lab_trainers.py").write_text(textwrap.dedent("""
        from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
        class nnUNetTrainerMyLab(nnUNetTrainer):
            pass
    """))
    names = ["nnUNetTrainer", "nnUNetTrainerMambaBase"] + [name for name, _ in discovery.concrete_trainers()]
    found = run_lookup(names, clean_env())
    assert found["nnUNetTrainer"].startswith("nnunetv2.training")
    assert found["nnUNetTrainerMambaBase"] == "nnunetv2_mamba.trainers.base"
    for name in names[2:]:
        assert found[name].startswith("nnunetv2_mamba.trainers."), name
    # A user's own nnUNet_extTrainer value is kept and searched first.
    found = run_lookup(["nnUNetTrainerMyLab", "nnUNetTrainerMambaBase"],
                       clean_env(**{EXT_TRAINER_ENV_VAR: str(user_dir)}))
    assert found == {"nnUNetTrainerMyLab": "my_lab_trainers",
                     "nnUNetTrainerMambaBase": "nnunetv2_mamba.trainers.base"}


def _lookup_in_child(queue):
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    queue.put(recursive_find_trainer_class_by_name("nnUNetTrainerMambaBase").__module__)


def test_lookup_works_in_spawned_worker_processes():
    # nnU-Net's DDP training starts its workers with the 'spawn' method.
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_lookup_in_child, args=(queue,))
    process.start()
    process.join(300)
    assert process.exitcode == 0
    assert queue.get(timeout=5) == "nnunetv2_mamba.trainers.base"


def test_a_broken_trainer_module_does_not_hide_the_others(tmp_path, monkeypatch, caplog):
    (tmp_path / "broken_trainer_module_xyz.py").write_text("raise ImportError('needs a package that is missing')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    real_names = discovery.trainer_module_names()
    monkeypatch.setattr(discovery, "trainer_module_names", lambda: ["broken_trainer_module_xyz"] + real_names)
    errors = {}
    classes = discovery.load_trainer_classes(errors)
    assert "needs a package that is missing" in errors["broken_trainer_module_xyz"]
    assert "nnUNetTrainerMambaBase" in classes
    assert set(name for name, _ in discovery.concrete_trainers()) <= set(classes)
    assert "broken_trainer_module_xyz" in caplog.text


def test_registration_module_imports_only_os():
    source = Path(registration.__file__).read_text()
    imports = [line for line in source.splitlines() if line.startswith(("import ", "from "))]
    assert imports == ["import os"]
