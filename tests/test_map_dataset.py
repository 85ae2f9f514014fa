"""Mapping whole AA datasets to CG datasets."""
import numpy as np
import pytest
import yaml

from openmm_backmap import systems
from openmm_backmap.data import AADataset, CGDataset, simulate_reference
from openmm_backmap.mapping import CGMapping, map_dataset


@pytest.fixture(scope="module")
def adp_data(tmp_path_factory):
    ala2 = systems.alanine_dipeptide("obc2")
    path = tmp_path_factory.mktemp("map") / "adp.h5"
    simulate_reference(path, ala2.topology, ala2.system, ala2.positions, n_steps=300, report_interval=10,
                       platform="Reference", progress=False)
    return path


def test_map_dataset_matches_frame_by_frame_mapping(adp_data, tmp_path):
    with AADataset(adp_data) as aa:
        mapping = CGMapping.from_preset(aa.topology, "backbone-cb")
        out = map_dataset(aa, mapping, tmp_path / "cg.h5", chunk_size=7, progress=False)
        aware = mapping.with_constraints(aa.system)  # what map_dataset must have used
        with CGDataset(out) as cg:
            assert cg.n_frames == aa.n_frames and cg.n_atoms == 6
            np.testing.assert_array_equal(cg.step, aa.step)
            np.testing.assert_array_equal(cg.potential_energy, aa.potential_energy)
            np.testing.assert_allclose(cg.positions[:], aware.map_positions(aa.positions[:].astype(float)), atol=1e-6)
            np.testing.assert_allclose(cg.forces[:], aware.map_forces(aa.forces[:].astype(float)), rtol=1e-5, atol=1e-3)
            # constraint-aware: the N bead carries the force on its hydrogen too
            n_bead = [a.name for a in cg.topology.atoms()].index("N")
            top = aa.mdtraj_topology
            n_idx = top.select("resname ALA and name N")[0]
            h_idx = top.select("resname ALA and name H")[0]
            f = aa.forces[4].astype(float)
            np.testing.assert_allclose(cg.forces[4][n_bead], f[n_idx] + f[h_idx], rtol=1e-5, atol=1e-3)
            stored = yaml.safe_load(cg.text("mapping"))
            assert stored["format"] == "openmm-backmap-mapping" and len(stored["beads"]) == 6
            assert cg.settings["constraint_aware_forces"] is True
            assert [b.index for b in (a for a in cg.topology.atoms())] == list(range(6))
            assert cg.topology.getNumBonds() == 5


def test_map_dataset_refuses_foreign_mapping_and_keeps_files(adp_data, tmp_path):
    ala2_vac = systems.liquid("BENZ", n_molecules=4, density_g_cm3=0.5, cutoff_nm=0.45, switch_nm=0.4)
    other = CGMapping.from_preset(ala2_vac.topology, "molecule")
    with pytest.raises(ValueError, match="another topology"):
        map_dataset(adp_data, other, tmp_path / "x.h5", progress=False)
    assert not (tmp_path / "x.h5").exists() and not (tmp_path / "x.h5.partial").exists()
    existing = tmp_path / "exists.h5"
    existing.write_text("precious")
    with AADataset(adp_data) as aa:
        mapping = CGMapping.from_preset(aa.topology, "ca")
    with pytest.raises(FileExistsError):
        map_dataset(adp_data, mapping, existing, progress=False)
    assert existing.read_text() == "precious"
