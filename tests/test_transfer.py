"""Size transfer: systems.replicate, and a CG potential trained on a small box used on a box 8x larger."""
import copy
import sys

import numpy as np
import openmm
import openmm.unit as u
import pytest
import torch

from openmm_backmap import systems
from openmm_backmap.data import CGDataset, simulate_reference
from openmm_backmap.mapping import CGMapping, map_dataset
from openmm_backmap.potential import CGPotential, ForceMatchingTrainer, create_cg_system

NETWORK = {"hidden": 16, "n_rbf": 8, "cutoff_nm": 0.5, "n_interactions": 1}
#: Copy shifts of a 2x2x2 tiling in units of the box vectors, in the copy order of systems.replicate.
SHIFTS = np.array([[i, j, k] for i in range(2) for j in range(2) for k in range(2)], dtype=float)


@pytest.fixture(scope="module")
def benzene(tmp_path_factory):
    """24 benzene molecules (1.53 nm box) and 30 frames of AA data with forces."""
    root = tmp_path_factory.mktemp("transfer")
    liq = systems.liquid("BENZ", 24, seed=3, cutoff_nm=0.6, switch_nm=0.5)
    aa = simulate_reference(root / "aa.h5", liq.topology, liq.system, liq.positions, n_steps=600,
                            report_interval=20, equilibration_steps=200, seed=1, progress=False)
    return liq, aa, root


@pytest.fixture(scope="module", params=["benzene-3bead", "molecule"])
def trained(request, benzene):
    """A tiny force-matched potential (bonds, angles, excluded volume with a 0.6 nm cutoff, SchNet with a 0.5 nm
    cutoff: every range below half the 1.53 nm box), with its network weights and energy offset perturbed so
    that both contribute visibly."""
    liq, aa, root = benzene
    mapping = CGMapping.from_preset(liq.topology, request.param)
    cg = map_dataset(aa, mapping, root / f"cg_{request.param}.h5", progress=False)
    potential = ForceMatchingTrainer(mapping, cg, network=NETWORK, priors={"cutoff_nm": 0.6}, max_epochs=1,
                                     batch_size=8, dtype="float64", progress=False).fit()
    torch.manual_seed(0)
    with torch.no_grad():
        potential.energy_offset.fill_(-123.4)
        for p in potential.networks[0].parameters():
            p.add_(0.3 * torch.randn_like(p))
    with CGDataset(cg) as ds:
        x, box = ds.positions[[3, 27]].astype(np.float64), ds.box_vectors[[3, 27]].astype(np.float64)
    big_top, _, big_box = systems.replicate(liq.topology, liq.positions, liq.topology.getPeriodicBoxVectors())
    big_mapping = CGMapping.from_preset(big_top, request.param)
    return mapping, potential, x, box, big_mapping, request.param


def _tile(x, box, n=2):
    """Frames (B, beads, 3) tiled n x n x n in the copy order of systems.replicate -> (B, n^3 beads, 3), and the
    boxes (B, 3, 3) scaled by n."""
    copies = np.array([[i, j, k] for i in range(n) for j in range(n) for k in range(n)], dtype=float)
    shifts = np.einsum("ck,bkd->bcd", copies, box)  # (B, n^3, 3)
    return (x[:, None] + shifts[:, :, None]).reshape(len(x), -1, 3), n * box


# --------------------------------------------------------------------------------------------- replicate
def test_replicate_tiles_topology_positions_and_box(benzene):
    liq = benzene[0]
    top, xyz, box = systems.replicate(liq.topology, liq.positions, liq.topology.getPeriodicBoxVectors())
    n = liq.topology.getNumAtoms()
    assert top.getNumAtoms() == 8 * n and xyz.shape == (8 * n, 3)
    assert top.getNumBonds() == 8 * liq.topology.getNumBonds()
    assert top.getNumResidues() == 8 * liq.topology.getNumResidues() and top.getNumChains() == 8
    edge = liq.metadata["box_nm"][0]
    np.testing.assert_allclose(box, np.eye(3) * 2 * edge, rtol=1e-15)
    np.testing.assert_allclose(top.getPeriodicBoxVectors().value_in_unit(u.nanometer), box)
    np.testing.assert_array_equal(xyz[:n], liq.positions_nm)  # copy 0 is the input
    for c, shift in enumerate(SHIFTS):
        np.testing.assert_allclose(xyz[c * n:(c + 1) * n], liq.positions_nm + shift * edge, atol=1e-12)
    atoms = list(top.atoms())
    assert [a.name for a in atoms[5 * n:6 * n]] == [a.name for a in liq.topology.atoms()]
    bonds = {(a.index, b.index) for a, b in top.bonds()}
    assert all((a.index + 7 * n, b.index + 7 * n) in bonds for a, b in liq.topology.bonds())


def test_replicate_triclinic_box_and_bad_input():
    top = openmm.app.Topology()
    residue = top.addResidue("X", top.addChain())
    a0 = top.addAtom("C1", openmm.app.element.carbon, residue)
    a1 = top.addAtom("C2", openmm.app.element.carbon, residue)
    top.addBond(a0, a1)
    box = np.array([[2.0, 0, 0], [0.9, 2.0, 0], [-0.8, 0.7, 2.0]])  # reduced triclinic
    xyz = np.array([[0.1, 0.2, 0.3], [0.25, 0.2, 0.3]])
    tiled, pos, new_box = systems.replicate(top, xyz * u.nanometer, box * u.nanometer, repeats=(1, 3, 2))
    assert tiled.getNumAtoms() == 12 and tiled.getNumBonds() == 6
    # reduced form again (|b_x| <= a_x/2, |c_x| <= a_x/2, |c_y| <= b_y/2), same volume, the same lattice
    assert abs(new_box[1, 0]) <= new_box[0, 0] / 2 and abs(new_box[2, 0]) <= new_box[0, 0] / 2
    assert abs(new_box[2, 1]) <= new_box[1, 1] / 2
    assert np.linalg.det(new_box) == pytest.approx(6 * np.linalg.det(box))
    lattice = np.linalg.solve(box.T, new_box.T).T  # new vectors in units of the old ones: integers
    np.testing.assert_allclose(lattice, np.round(lattice), atol=1e-12)
    np.testing.assert_allclose(pos[10], xyz[0] + 2 * box[1] + box[2])  # copy (0, 2, 1) = 5
    for bad in [0, (2, 2), (1, 1.5, 1), True]:
        with pytest.raises(ValueError, match="repeats"):
            systems.replicate(top, xyz, box, repeats=bad)
    with pytest.raises(ValueError, match="reduced form"):
        systems.replicate(top, xyz, box.T)


# ---------------------------------------------------------------------------------------------- transfer
def test_transferred_energy_is_extensive_and_forces_copy(trained):
    mapping, potential, x, box, big_mapping, _ = trained
    big = potential.transfer(big_mapping)
    assert big.n_beads == 8 * potential.n_beads and big.mapping_fingerprint == big_mapping.topology_fingerprint
    assert big.bead_types == list(big_mapping.bead_types)
    big.check_mapping(big_mapping)
    # the same terms, with 8x the interactions and the same parameters; the excluded volume (with a cutoff)
    # searches neighbours instead of listing all pairs
    kinds = [type(t).__name__ for t in potential.priors]
    assert [type(t).__name__ for t in big.priors] == kinds[:-1] + ["NeighborExcludedVolumePrior"]
    for new, old in zip(big.priors[:-1], potential.priors[:-1]):  # bonded
        assert new.num_interactions == 8 * old.num_interactions
        assert torch.equal(new.k, old.k.repeat(8))
    excluded = big.priors[-1].config()
    assert excluded["sigma_nm"] == potential.priors[-1].config()["sigma_nm"] and excluded["cutoff_nm"] == 0.6
    assert excluded["n_beads"] == big.n_beads
    assert len(excluded["bonds"]) == 8 * len(potential.priors[-1].config()["bonds"])
    for name, value in potential.networks[0].state_dict().items():
        assert torch.equal(big.networks[0].state_dict()[name], value)  # weights shared bit for bit
    assert big.energy_offset.item() == pytest.approx(8 * -123.4, rel=1e-15)
    source = big.metadata["transferred_from"]
    assert source["mapping_fingerprint"] == mapping.topology_fingerprint and source["n_beads"] == potential.n_beads
    assert (source["n_units"], source["n_units_new"], source["energy_offset_scale"]) == (24, 192, 8.0)
    assert "averaged_parameters" not in source  # the priors pool equal bead types: one value per term
    assert big.metadata["val_force_mse"] == potential.metadata["val_force_mse"]

    xs, boxes = _tile(x, box)
    e_small, f_small = potential.energy_and_forces(torch.tensor(x), torch.tensor(box))
    e_big, f_big = big.energy_and_forces(torch.tensor(xs), torch.tensor(boxes))
    np.testing.assert_allclose(e_big.numpy(), 8 * e_small.numpy(), rtol=1e-9)
    scale = float(f_small.abs().max())
    for c in range(8):
        np.testing.assert_allclose(f_big[:, c * potential.n_beads:(c + 1) * potential.n_beads].numpy(),
                                   f_small.numpy(), rtol=0, atol=1e-9 * scale)
    # the differentiable path (training) agrees with the MD path
    positions = torch.tensor(xs, requires_grad=True)
    energy = big(positions, torch.tensor(boxes))
    (grad,) = torch.autograd.grad(energy.sum(), positions)
    np.testing.assert_allclose(energy.detach().numpy(), e_big.numpy(), rtol=1e-12)
    np.testing.assert_allclose(-grad.numpy(), f_big.numpy(), rtol=0, atol=1e-9 * scale)


def test_larger_tiling_uses_cell_grids(trained, benzene):
    """3x3x3 copies of the 3-bead box (1944 beads), 4x4x4 of the 1-bead box (1536 beads): above the 800 beads
    from which neighbours (network and excluded volume) come from a cell grid."""
    _, potential, x, box, _, preset = trained
    n = 3 if preset == "benzene-3bead" else 4
    liq = benzene[0]
    top, _, _ = systems.replicate(liq.topology, liq.positions, liq.topology.getPeriodicBoxVectors(), repeats=n)
    big = potential.transfer(CGMapping.from_preset(top, preset))
    assert big.n_beads == n ** 3 * potential.n_beads > 800
    xs, boxes = _tile(x, box, n)
    e_small, f_small = potential.energy_and_forces(torch.tensor(x), torch.tensor(box))
    e_big, f_big = big.energy_and_forces(torch.tensor(xs), torch.tensor(boxes))
    np.testing.assert_allclose(e_big.numpy(), n ** 3 * e_small.numpy(), rtol=1e-9)
    np.testing.assert_allclose(f_big.reshape(2, n ** 3, -1, 3).numpy(),
                               f_small[:, None].expand(2, n ** 3, -1, 3).numpy(),
                               rtol=0, atol=1e-9 * float(f_small.abs().max()))


def test_transferred_potential_runs_in_openmm(trained):
    _, potential, x, box, big_mapping, _ = trained
    big = potential.transfer(big_mapping)
    system = create_cg_system(big_mapping, big, backend="torch")  # box from the tiled topology
    assert system.getNumParticles() == big.n_beads
    box_nm = big_mapping.to_openmm_topology().getPeriodicBoxVectors().value_in_unit(u.nanometer)
    np.testing.assert_allclose(system.getDefaultPeriodicBoxVectors()[0].value_in_unit(u.nanometer)[0], box_nm[0][0])
    context = openmm.Context(system, openmm.VerletIntegrator(1e-3), openmm.Platform.getPlatformByName("Reference"))
    xs, boxes = _tile(x, box)
    e_model, f_model = big.energy_and_forces(torch.tensor(xs), torch.tensor(boxes))
    e_small = potential.energy_and_forces(torch.tensor(x), torch.tensor(box))[0]
    for b in range(len(xs)):
        context.setPeriodicBoxVectors(*boxes[b])
        context.setPositions(xs[b])
        state = context.getState(getEnergy=True, getForces=True)
        energy = state.getPotentialEnergy().value_in_unit(u.kilojoule_per_mole)
        assert energy == pytest.approx(float(e_model[b]), rel=1e-6)
        assert energy == pytest.approx(8 * float(e_small[b]), rel=1e-6)
        forces = state.getForces(asNumpy=True).value_in_unit(u.kilojoule_per_mole / u.nanometer)
        np.testing.assert_allclose(forces, f_model[b].numpy(), rtol=1e-6, atol=1e-6 * float(f_model.abs().max()))


def test_transferred_potential_saves_loads_and_transfers_back(trained, tmp_path):
    mapping, potential, x, box, big_mapping, _ = trained
    big = potential.transfer(big_mapping)
    path = tmp_path / "big.pt"
    big.save(path)
    loaded = CGPotential.load(path, mapping=big_mapping)
    assert loaded.metadata["transferred_from"] == big.metadata["transferred_from"]
    assert loaded.units == big.units
    xs, boxes = _tile(x, box)
    x_big, box_big = torch.tensor(xs), torch.tensor(boxes)
    torch.testing.assert_close(loaded(x_big, box_big), big(x_big, box_big), rtol=1e-14, atol=0)
    # and back to the training box: the original potential again (offset scaled by 1/8)
    back = loaded.transfer(mapping)
    assert back.energy_offset.item() == pytest.approx(-123.4, rel=1e-14)
    torch.testing.assert_close(back(torch.tensor(x), torch.tensor(box)), potential(torch.tensor(x), torch.tensor(box)),
                               rtol=1e-12, atol=1e-9)
    # float32 potentials stay float32, with the same weights
    single = copy.deepcopy(potential).float()
    big32 = single.transfer(big_mapping)
    assert big32.energy_offset.dtype == torch.float32
    for name, value in single.networks[0].state_dict().items():
        assert torch.equal(big32.networks[0].state_dict()[name], value)
    energy32 = big32(torch.tensor(xs, dtype=torch.float32), torch.tensor(boxes, dtype=torch.float32))
    assert energy32.dtype == torch.float32
    np.testing.assert_allclose(energy32.detach().numpy(), big(torch.tensor(xs), torch.tensor(boxes)).detach().numpy(),
                               rtol=1e-4)


def test_transfer_to_another_box_size(trained):
    mapping, potential, _, _, _, preset = trained
    liq = systems.liquid("BENZ", 30, seed=5, cutoff_nm=0.6, switch_nm=0.5)
    other = CGMapping.from_preset(liq.topology, preset)
    moved = potential.transfer(other)
    assert moved.n_beads == 30 * potential.n_beads // 24
    assert moved.energy_offset.item() == pytest.approx(-123.4 * 30 / 24)
    for new, old in zip(moved.priors, potential.priors):
        if hasattr(old, "k"):  # bonded: 30/24 as many interactions, the same parameter values
            assert new.num_interactions * 24 == old.num_interactions * 30
            assert set(new.k.tolist()) == set(old.k.tolist())
    cg = other.map_positions(liq.positions_nm)
    box = np.asarray(liq.topology.getPeriodicBoxVectors().value_in_unit(u.nanometer))
    energy, forces = moved.energy_and_forces(torch.tensor(cg[None]), torch.tensor(box[None]))
    assert np.isfinite(energy.numpy()).all() and np.isfinite(forces.numpy()).all()


def test_transfer_refusals(trained, benzene):
    mapping, potential, _, _, big_mapping, preset = trained
    liq = benzene[0]
    hexane = systems.liquid("HEXA", 20, seed=1, cutoff_nm=0.6, switch_nm=0.5)
    with pytest.raises(ValueError, match="molecule HEXA .* never trained on .*BENZ"):
        potential.transfer(CGMapping.from_preset(hexane.topology, "hexane-3bead"))
    other_preset = "molecule" if preset == "benzene-3bead" else "benzene-3bead"
    with pytest.raises(ValueError, match="mapped to other beads than in training"):
        potential.transfer(CGMapping.from_preset(liq.topology, other_preset))
    no_box = CGMapping.from_preset(mapping.aa_topology, preset)  # an mdtraj topology: no box
    with pytest.raises(ValueError, match="the potential is periodic but the mapping's topology has no periodic box"):
        potential.transfer(no_box)
    # a potential that records no molecules (older files) needs its training mapping
    bare = CGPotential([*potential.priors, *potential.networks], n_priors=potential.n_priors,
                       bead_names=potential.bead_names, bead_types=potential.bead_types,
                       mapping_fingerprint=potential.mapping_fingerprint, periodic=True)
    with pytest.raises(ValueError, match="pass source_mapping"):
        bare.transfer(big_mapping)
    with pytest.raises(ValueError, match="another AA topology"):
        bare.transfer(big_mapping, source_mapping=big_mapping)
    assert bare.transfer(big_mapping, source_mapping=mapping).n_beads == 8 * potential.n_beads


def test_excluded_volume_without_cutoff(trained, monkeypatch):
    """Fitted without a cutoff, the excluded volume stays a list of all pairs (warning for large boxes) unless
    excluded_volume_cutoff_nm gives it one, which here restores exactly the potential fitted with that cutoff."""
    from openmm_backmap.potential import transfer as transfer_module
    from openmm_backmap.potential.priors import ExcludedVolumePrior

    _, potential, x, box, big_mapping, _ = trained
    config = potential.priors[-1].config()
    config["cutoff_nm"] = None
    bare = CGPotential([*potential.priors[:-1], ExcludedVolumePrior(**config), *potential.networks],
                       n_priors=potential.n_priors, bead_names=potential.bead_names, bead_types=potential.bead_types,
                       mapping_fingerprint=potential.mapping_fingerprint, periodic=True, units=potential.units,
                       energy_offset=-123.4).double()
    monkeypatch.setattr(transfer_module, "ALL_PAIRS_WARNING", 1000)
    with pytest.warns(RuntimeWarning, match="lists all .* pairs .* pass excluded_volume_cutoff_nm"):
        all_pairs = bare.transfer(big_mapping)
    assert type(all_pairs.priors[-1]).__name__ == "ExcludedVolumePrior"
    assert all_pairs.priors[-1].config()["cutoff_nm"] is None
    cut = bare.transfer(big_mapping, excluded_volume_cutoff_nm=0.6)
    assert cut.metadata["transferred_from"]["excluded_volume_cutoff_nm"] == 0.6
    xs, boxes = _tile(x, box)
    reference = potential.transfer(big_mapping).energy_and_forces(torch.tensor(xs), torch.tensor(boxes))
    for got, want in zip(cut.energy_and_forces(torch.tensor(xs), torch.tensor(boxes)), reference):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-9)
    with pytest.raises(ValueError, match="excluded_volume_cutoff_nm must be positive"):
        bare.transfer(big_mapping, excluded_volume_cutoff_nm=-1.0)


def test_neighbor_excluded_volume_equals_all_pairs_form():
    """NeighborExcludedVolumePrior = ExcludedVolumePrior with the same rule and cutoff: energies, autograd and
    analytic forces, and inside a CGPotential next to fused priors (also compiled), in triclinic boxes."""
    from openmm_backmap.potential.priors import (ExcludedVolumePrior, HarmonicBondPrior, NeighborExcludedVolumePrior,
                                                 excluded_pairs, nonbonded_pairs)

    n = 300
    bonds = [[3 * k, 3 * k + 1] for k in range(100)] + [[3 * k + 1, 3 * k + 2] for k in range(100)]
    rule = {"n_beads": n, "bonds": bonds, "exclusion_bonds": 2, "sigma_nm": [[0.3, 0.25], [0.25, 0.0]],
            "bead_types": ["A", "B", "A"] * 100, "cutoff_nm": 0.7}
    listed, searched = ExcludedVolumePrior(**rule), NeighborExcludedVolumePrior(**rule)
    every = {tuple(p) for p in np.stack(np.triu_indices(n, 1), 1).tolist()}
    assert every - {tuple(p) for p in nonbonded_pairs(n, bonds, 2).tolist()} == {
        tuple(p) for p in excluded_pairs(n, bonds, 2).tolist()}
    generator = torch.Generator().manual_seed(0)
    x = (torch.rand(3, n, 3, generator=generator, dtype=torch.float64) * 2.5).requires_grad_(True)
    box = torch.eye(3, dtype=torch.float64).repeat(3, 1, 1) * 2.5
    box[1, 1, 0], box[2, 2, :2] = 0.6, torch.tensor([-0.4, 1.0], dtype=torch.float64)
    e_listed, e_searched = listed(x, box), searched(x, box)
    torch.testing.assert_close(e_searched, e_listed, rtol=1e-12, atol=0)
    grad = torch.autograd.grad(e_searched.sum(), x)[0]
    torch.testing.assert_close(grad, torch.autograd.grad(e_listed.sum(), x)[0], rtol=1e-10, atol=1e-9)
    energy, forces = searched.energy_and_forces(x, box)
    torch.testing.assert_close(energy, e_searched.detach(), rtol=1e-14, atol=0)
    torch.testing.assert_close(forces, -grad, rtol=1e-10, atol=1e-9)

    bond = HarmonicBondPrior(bonds, [0.2] * 200, [1000.0] * 200)
    names = [str(i) for i in range(n)]
    mixed = CGPotential([bond, searched], n_priors=2, bead_names=names, bead_types=rule["bead_types"],
                        mapping_fingerprint="-", periodic=True, energy_offset=1.5)
    fused = CGPotential([bond, listed], n_priors=2, bead_names=names, bead_types=rule["bead_types"],
                        mapping_fingerprint="-", periodic=True, energy_offset=1.5)
    want = fused.md_energy_and_forces(x.detach(), box)
    scripted = torch.jit.script(mixed)
    for got in (mixed.md_energy_and_forces(x.detach(), box), scripted.md_energy_and_forces(x.detach(), box)):
        torch.testing.assert_close(got[0], want[0], rtol=1e-12, atol=0)
        torch.testing.assert_close(got[1], want[1], rtol=1e-10, atol=1e-9)
    alone = CGPotential([searched], n_priors=1, bead_names=names, bead_types=rule["bead_types"],
                        mapping_fingerprint="-", periodic=True)
    torch.testing.assert_close(alone.md_energy_and_forces(x.detach(), box)[1], forces, rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="cutoff_nm must be"):
        NeighborExcludedVolumePrior(**{**rule, "cutoff_nm": None})


def test_network_and_neighbor_prior_share_one_search():
    """A SchNet and a neighbour-searched excluded volume with different cutoffs and exclusions share one pair
    search in md_energy_and_forces (eager and compiled); energies and forces equal autograd of the separate
    terms, and one search is indeed made."""
    from openmm_backmap.potential import neighbors
    from openmm_backmap.potential.priors import NeighborExcludedVolumePrior
    from openmm_backmap.potential.schnet import SchNet

    n = 120
    bonds = [[3 * k, 3 * k + 1] for k in range(40)] + [[3 * k + 1, 3 * k + 2] for k in range(40)]
    types = ["A", "B", "A"] * 40
    prior = NeighborExcludedVolumePrior(n_beads=n, bonds=bonds, exclusion_bonds=2, sigma_nm=[[0.3, 0.25], [0.25, 0.2]],
                                        bead_types=types, cutoff_nm=0.7)
    torch.manual_seed(0)
    net = SchNet([0, 1, 0] * 40, hidden=8, n_rbf=6, cutoff_nm=0.9, n_interactions=2, exclusions=bonds).double()
    potential = CGPotential([prior, net], n_priors=1, bead_names=[str(i) for i in range(n)], bead_types=types,
                            mapping_fingerprint="-", periodic=True).double()
    assert potential.shared_pair_cutoff == 0.9
    generator = torch.Generator().manual_seed(1)
    x = torch.rand(2, n, 3, generator=generator, dtype=torch.float64) * 2.2
    box = torch.eye(3, dtype=torch.float64).repeat(2, 1, 1) * 2.2
    box[1, 1, 0], box[1, 2, :2] = 0.5, torch.tensor([-0.3, 0.9], dtype=torch.float64)
    xr = x.clone().requires_grad_(True)
    want_energy = prior(xr, box) + net(xr, box)
    want_forces = -torch.autograd.grad(want_energy.sum(), xr)[0]
    calls = []
    search = neighbors.neighbor_pairs

    def counting(*args, **kwargs):
        calls.append(args[1])
        return search(*args, **kwargs)

    import openmm_backmap.potential.model as model_module
    with pytest.MonkeyPatch.context() as patch:
        for module in (model_module, neighbors, sys.modules[SchNet.__module__], sys.modules[prior.__module__]):
            if hasattr(module, "neighbor_pairs"):
                patch.setattr(module, "neighbor_pairs", counting)
        energy, forces = potential.md_energy_and_forces(x, box)
    assert calls == [0.9]
    torch.testing.assert_close(energy, want_energy.detach(), rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(forces, want_forces, rtol=1e-10, atol=1e-9)
    energy, forces = torch.jit.script(potential).md_energy_and_forces(x, box)
    torch.testing.assert_close(energy, want_energy.detach(), rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(forces, want_forces, rtol=1e-10, atol=1e-9)
