"""Session fixtures shared by the backmapper and reporter tests: a short alanine-dipeptide trajectory and a tiny
backmapper trained on it (seconds on 2 cores)."""
from __future__ import annotations

import pytest
import torch  # noqa: F401  (before openmm, see openmm_backmap._openmmtorch)


@pytest.fixture(scope="session")
def adp_aa_data(tmp_path_factory):
    """(TestSystem, path) of 1200 frames of alanine dipeptide in OBC2, one frame every 0.1 ps."""
    from openmm_backmap import systems
    from openmm_backmap.data import simulate_reference

    adp = systems.alanine_dipeptide("obc2")
    path = tmp_path_factory.mktemp("adp") / "aa.h5"
    simulate_reference(path, adp.topology, adp.system, adp.positions, n_steps=60_000, report_interval=50,
                       equilibration_steps=1000, seed=3, platform="Reference", progress=False)
    return adp, path


@pytest.fixture(scope="session")
def adp_mapping(adp_aa_data):
    from openmm_backmap.mapping import CGMapping

    return CGMapping.from_preset(adp_aa_data[0].topology, "backbone-cb")


@pytest.fixture(scope="session")
def tiny_backmapper(adp_aa_data, adp_mapping):
    """A small temporally coherent backmapper trained for a few epochs (quality is not the point)."""
    from openmm_backmap.backmap import BackmapperTrainer

    trainer = BackmapperTrainer(adp_mapping, adp_aa_data[1], max_epochs=4, batch_size=64, library_size=200,
                                architecture={"hidden": 64, "latent_dim": 4, "n_layers": 2}, n_blocks=5,
                                progress=False, seed=1)
    return trainer.fit()


@pytest.fixture(scope="session")
def tiny_residue_backmapper(adp_aa_data, adp_mapping):
    """The tiny backmapper with one unit per residue (ACE, ALA, NME), each in the frame of its own and its
    bonded residues' beads."""
    from openmm_backmap.backmap import BackmapperTrainer

    trainer = BackmapperTrainer(adp_mapping, adp_aa_data[1], max_epochs=2, batch_size=64, library_size=200,
                                architecture={"hidden": 64, "latent_dim": 4, "n_layers": 2, "units": "residue"},
                                n_blocks=5, progress=False, seed=1)
    return trainer.fit()
