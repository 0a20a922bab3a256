"""The installed distribution: one import package, the start-up hook, nothing generic at the top level."""
import importlib.metadata
import sysconfig

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
