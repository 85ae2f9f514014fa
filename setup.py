"""Installation script for openmm-backmap.

Pins that must stay pinned are explained next to them.
"""
from pathlib import Path

from setuptools import find_packages, setup

here = Path(__file__).parent
version = {}
exec((here / "openmm_backmap" / "_version.py").read_text(), version)

install_requires = [
    "openmm==8.6.1",
    # openmmtorch 1.5 from PyPI links the CUDA build of libtorch, so the CPU-only torch wheel cannot
    # load it (the CUDA wheel runs fine on CPU-only machines).  With torch >= 2.10 every TorchForce
    # evaluation fails with "set_stride is not allowed on a Tensor created from .data or .detach()"
    # (openmm-torch issue #175).  torch 2.9.1 + openmm 8.6.1 + openmmtorch 1.5 is the verified set.
    "torch>=2.8,<2.10",
    "openmmtorch==1.5",
    "mdtraj>=1.10",
    "parmed>=4.2",
    "numpy>=1.24",
    "h5py>=3.8",
    "tables>=3.9",  # PyTables: lets mdtraj open the .h5 AA trajectories the BackmapReporter writes
    "scikit-learn>=1.3",  # Gaussian mixture over the backmapper's latents
    "pyyaml>=6.0",
    "rdkit>=2023.9",
    "scipy>=1.10",
    "tqdm>=4.60",
    "matplotlib>=3.7",
    "deeptime>=0.4.4",
]

setup(
    name="openmm-backmap",
    version=version["__version__"],
    description=(
        "Force-matched CG potentials as OpenMM forces, on-the-fly temporally coherent backmapping "
        "of CG simulations, and differentiable AA energies from an openmm.System"
    ),
    long_description=(here / "README.md").read_text(),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.10",
    packages=find_packages(include=["openmm_backmap", "openmm_backmap.*"]),
    package_data={"openmm_backmap": ["data/*.yaml"]},
    install_requires=install_requires,
    # The test extra includes the docs tools: tests/test_docs.py builds the docs with warnings as errors.
    extras_require={"test": ["pytest>=7.4", "sphinx>=7", "myst-parser>=2"], "docs": ["sphinx>=7", "myst-parser>=2"]},
    entry_points={"console_scripts": ["openmm-backmap=openmm_backmap.cli:main"]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Chemistry",
        "Intended Audience :: Science/Research",
    ],
)
