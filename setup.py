"""nnunetv2-mamba: Mamba segmentation networks as nnU-Net v2 trainers.

Three source folders install as one import package, ``nnunetv2_mamba``:
``nnunetv2_mamba/`` (core), ``trainers/`` -> ``nnunetv2_mamba.trainers`` and
``network_architectures/`` -> ``nnunetv2_mamba.network_architectures``.

A one-line ``nnunetv2_mamba.pth`` start-up hook is installed next to the package so that nnU-Net finds our
trainers (through ``nnUNet_extTrainer``) in every Python process, with no environment variable to set.
"""
import os

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py
from setuptools.command.editable_wheel import editable_wheel

HERE = os.path.dirname(os.path.abspath(__file__))
PTH_NAME = "nnunetv2_mamba.pth"
# Executed by site.py at interpreter start-up. It must never fail: if the package is gone (a stale .pth),
# nothing happens. The hook only edits os.environ; it imports neither torch nor nnunetv2.
PTH_LINE = ("import sys; exec('try:\\n import nnunetv2_mamba._startup\\nexcept Exception:\\n pass')\n")


class BuildPyWithStartupHook(build_py):
    """build_py that also places the start-up .pth at the root of the wheel (site-packages)."""

    def run(self):
        super().run()
        target = os.path.join(self.build_lib, PTH_NAME)
        os.makedirs(self.build_lib, exist_ok=True)
        with open(target, "w") as handle:
            handle.write(PTH_LINE)

    def get_outputs(self, include_bytecode=True):
        return super().get_outputs(include_bytecode) + [os.path.join(self.build_lib, PTH_NAME)]


class EditableWheelWithStartupHook(editable_wheel):
    """editable_wheel that also ships the start-up .pth (setuptools packs every file of this folder)."""

    def _install_namespaces(self, installation_dir, pth_prefix):
        with open(os.path.join(installation_dir, PTH_NAME), "w") as handle:
            handle.write(PTH_LINE)
        return super()._install_namespaces(installation_dir, pth_prefix)


def read_version():
    with open(os.path.join(HERE, "nnunetv2_mamba", "version.py")) as handle:
        namespace = {}
        exec(handle.read(), namespace)
        return namespace["__version__"]


# The three source folders and the import names they install as. Nothing else of the checkout (tests/,
# benchmarks/, setup.py) is part of the package; nnunetv2_mamba/__init__.py maps the same two folders when the
# package is imported straight from a checkout.
MAPPED_FOLDERS = {"nnunetv2_mamba.trainers": "trainers",
                  "nnunetv2_mamba.network_architectures": "network_architectures"}


def mapped_packages(name, folder):
    """Return ``name`` and the dotted names of the packages below ``folder`` (so sub-folders install too)."""
    return [name] + [f"{name}.{sub}" for sub in find_packages(where=os.path.join(HERE, folder))]


packages = find_packages(include=["nnunetv2_mamba", "nnunetv2_mamba.*"])
for package_name, package_folder in MAPPED_FOLDERS.items():
    packages += mapped_packages(package_name, package_folder)

setup(
    name="nnunetv2-mamba",
    version=read_version(),
    description="Mamba (selective state-space) segmentation networks as nnU-Net v2 trainers",
    long_description=open(os.path.join(HERE, "README.md")).read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=packages,
    package_dir={"nnunetv2_mamba": "nnunetv2_mamba", **MAPPED_FOLDERS},
    include_package_data=False,
    cmdclass={"build_py": BuildPyWithStartupHook, "editable_wheel": EditableWheelWithStartupHook},
    install_requires=[
        "nnunetv2>=2.8,<2.9",
        "torch>=2.1.2",
        "dynamic-network-architectures>=0.4.4,<0.5",
        "SimpleITK>=2.2.1",
        "batchgenerators>=0.25.1",
        "einops",
        "nilearn>=0.10",  # ships the MNI152 template that the demo dataset is built from (no download)
        "numpy",
    ],
    extras_require={
        # Compiled CUDA kernels: need nvcc and a CUDA build of torch; the plugin runs without them.
        "cuda": ["mamba-ssm>=2.0", "causal-conv1d>=1.2"],
        "test": ["pytest>=7"],
    },
    entry_points={"console_scripts": ["nnunetv2_mamba = nnunetv2_mamba.cli:main"]},
)
