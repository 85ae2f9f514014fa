"""CGPotential: priors + network as one model, its files, and its OpenMM forces."""
import numpy as np
import openmm
import openmm.app as app
import openmm.unit as u
import pytest
import torch

from openmm_backmap import systems
from openmm_backmap.data import CGDataset, simulate_reference
from openmm_backmap.mapping import CGMapping, map_dataset
from openmm_backmap.potential import CGPotential, ForceMatchingTrainer, create_cg_system
from openmm_backmap.potential.export import create_force
from openmm_backmap.reporters import CGRunGuard, SimulationBlowUp


@pytest.fixture(scope="module")
def ala2_cg(tmp_path_factory):
    """200 ps of ADP/OBC2 mapped to backbone-cb (1000 frames)."""
    root = tmp_path_factory.mktemp("pot")
    ts = systems.alanine_dipeptide("obc2")
    aa = simulate_reference(root / "aa.h5", ts.topology, ts.system, ts.positions, n_steps=100_000,
                            report_interval=100, equilibration_steps=2000, progress=False)
    mapping = CGMapping.from_preset(ts.topology, "backbone-cb")
    cg = map_dataset(aa, mapping, root / "cg.h5", progress=False)
    return mapping, cg


@pytest.fixture(scope="module")
def trained(ala2_cg, tmp_path_factory):
    mapping, cg = ala2_cg
    root = tmp_path_factory.mktemp("train")
    trainer = ForceMatchingTrainer(mapping, cg, network={"hidden": 16, "n_rbf": 8, "n_interactions": 1,
                                                         "cutoff_nm": 0.6},
                                   max_epochs=3, batch_size=64, learning_rate=3e-3, dtype="float64",
                                   checkpoint=root / "ckpt.pt",
                                   log=root / "log.csv", progress=False)
    return trainer.fit(), trainer, root


def _positions(cg_path, frames):
    with CGDataset(cg_path) as ds:
        return ds.positions[frames].astype(np.float64), ds.forces[frames].astype(np.float64)


def test_training_improves_on_priors_and_logs(trained):
    potential, trainer, root = trained
    meta = potential.metadata
    assert meta["val_force_mse"] < meta["priors_only_val_force_mse"]  # the network adds to the priors
    assert meta["frames"]["train"] + meta["frames"]["val"] + meta["frames"]["test"] == 1000
    lines = (root / "log.csv").read_text().splitlines()
    assert lines[0].startswith("epoch,train_force_mse,val_force_mse") and len(lines) == 4
    assert len(potential.priors) == 4 and len(potential.networks) == 1  # bond, angle, dihedral, excl. volume


def test_resume_continues_from_checkpoint(ala2_cg, trained):
    mapping, cg = ala2_cg
    _, first, root = trained
    resumed = ForceMatchingTrainer(mapping, cg, network=first.network, max_epochs=4, batch_size=64,
                                   learning_rate=3e-3, dtype="float64",
                                   checkpoint=root / "ckpt.pt", log=root / "log2.csv", progress=False)
    resumed.fit(resume=True)
    assert [row["epoch"] for row in resumed.history] == [1, 2, 3, 4]
    assert resumed.history[:3] == first.history


@pytest.mark.parametrize("backend", ["torch", "python"])
@pytest.mark.parametrize("platform", ["Reference", "CPU"])
def test_openmm_force_equals_model(ala2_cg, trained, backend, platform):
    mapping, cg = ala2_cg
    potential = trained[0]
    x, _ = _positions(cg, [5, 500])
    system = create_cg_system(mapping, potential, backend=backend)
    assert system.getNumParticles() == 6
    np.testing.assert_allclose([system.getParticleMass(i)._value for i in range(6)], mapping.bead_masses)
    ctx = openmm.Context(system, openmm.VerletIntegrator(1e-3), openmm.Platform.getPlatformByName(platform))
    e_model, f_model = potential.energy_and_forces(torch.tensor(x))
    for b in range(len(x)):
        ctx.setPositions(x[b])
        state = ctx.getState(getEnergy=True, getForces=True)
        energy = state.getPotentialEnergy().value_in_unit(u.kilojoule_per_mole)
        forces = state.getForces(asNumpy=True).value_in_unit(u.kilojoule_per_mole / u.nanometer)
        assert energy == pytest.approx(float(e_model[b]), rel=1e-5)
        np.testing.assert_allclose(forces, f_model[b].numpy(), rtol=1e-5, atol=1e-4)


def test_cg_simulation_runs_with_guard(ala2_cg, trained):
    mapping, cg = ala2_cg
    potential = trained[0]
    system = create_cg_system(mapping, potential)
    integrator = openmm.LangevinMiddleIntegrator(300 * u.kelvin, 1 / u.picosecond, 0.004 * u.picosecond)
    integrator.setRandomNumberSeed(3)
    sim = app.Simulation(mapping.to_openmm_topology(), system, integrator, openmm.Platform.getPlatformByName("Reference"))
    sim.context.setPositions(_positions(cg, [0])[0][0])
    sim.context.setVelocitiesToTemperature(300 * u.kelvin, 1)
    guard = CGRunGuard(100)
    sim.reporters.append(guard)
    sim.step(1000)
    assert guard.last_good_state is not None
    x = sim.context.getState(getPositions=True).getPositions(asNumpy=True).value_in_unit(u.nanometer)
    bonds = np.linalg.norm(x[1:] - x[:-1], axis=-1)[[0, 4]]  # ACE C-N and ALA C... peptide-like bonds stay bonded
    assert np.all(bonds < 0.3)


def test_guard_stops_blow_up_and_keeps_last_good_frame(tmp_path):
    system = openmm.System()
    for _ in range(2):
        system.addParticle(12.0)
    blast = openmm.CustomExternalForce("-k*x")  # a constant push that heats the system without bound
    blast.addGlobalParameter("k", 0.0)
    for i in range(2):
        blast.addParticle(i, [])
    system.addForce(blast)
    top = app.Topology()
    res = top.addResidue("X", top.addChain())
    for _ in range(2):
        top.addAtom("C", app.Element.getBySymbol("C"), res)
    sim = app.Simulation(top, system, openmm.VerletIntegrator(0.002), openmm.Platform.getPlatformByName("Reference"))
    sim.context.setPositions([[0, 0, 0], [0.5, 0, 0]])
    guard = CGRunGuard(10, max_temperature_K=1000, last_good_file=tmp_path / "last_good.pdb")
    sim.reporters.append(guard)
    sim.step(50)
    sim.context.setParameter("k", 1e6)
    with pytest.raises(SimulationBlowUp, match=r"blew up at step \d+: the kinetic temperature") as info:
        sim.step(100)
    assert info.value.step > 50 and (tmp_path / "last_good.pdb").exists()
    good_step = int(round(guard.last_good_state.getStepCount()))
    assert 50 <= good_step < info.value.step
    guard.restore(sim)
    assert sim.currentStep == good_step


def test_save_load_roundtrip_and_refusals(ala2_cg, trained, tmp_path):
    mapping, cg = ala2_cg
    potential = trained[0]
    path = tmp_path / "ala2.pt"
    potential.save(path)
    loaded = CGPotential.load(path, mapping=mapping)
    x = torch.tensor(_positions(cg, [1, 2, 3])[0])
    torch.testing.assert_close(loaded(x), potential(x))
    assert loaded.metadata["val_force_mse"] == potential.metadata["val_force_mse"]
    # another molecule's mapping
    other = CGMapping.from_preset(systems.chignolin("vacuum").topology, "ca")
    with pytest.raises(ValueError, match="another AA topology"):
        CGPotential.load(path, mapping=other)
    with pytest.raises(ValueError, match="another AA topology"):
        create_cg_system(other, potential)
    # same molecule, different beads
    ca = CGMapping.from_preset(mapping.aa_topology, "ca")
    with pytest.raises(ValueError, match="expects 6 beads"):
        potential.check_mapping(ca)
    # corrupt and foreign files
    bad = tmp_path / "bad.pt"
    bad.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ValueError, match="not a readable"):
        CGPotential.load(bad)
    pickled = tmp_path / "pickled.pt"
    torch.save({"header": object()}, pickled)  # would need code execution to load
    with pytest.raises(ValueError, match="not a readable"):
        CGPotential.load(pickled)
    with pytest.raises(FileNotFoundError):
        CGPotential.load(tmp_path / "missing.pt")
    with pytest.raises(ValueError, match="unknown backend"):
        create_force(potential, backend="jax")


def test_default_trainer_has_a_network_and_none_means_priors_only(ala2_cg):
    mapping, cg = ala2_cg
    assert ForceMatchingTrainer(mapping, cg).network["hidden"] == 64
    assert ForceMatchingTrainer(mapping, cg, network=None).network is None
    assert ForceMatchingTrainer(mapping, cg, network={"hidden": 8}).network["n_interactions"] == 3


def test_trainer_refuses_bad_data(ala2_cg, tmp_path):
    mapping, cg = ala2_cg
    other = CGMapping.from_preset(mapping.aa_topology, "ca")
    with pytest.raises(ValueError, match="not mapped with this mapping"):
        ForceMatchingTrainer(other, cg, progress=False).fit()
    import h5py
    broken = tmp_path / "nan.h5"
    broken.write_bytes(cg.read_bytes())
    with h5py.File(broken, "a") as f:
        f["forces"][7, 2, 1] = np.nan
    with pytest.raises(ValueError, match="NaN/inf forces"):
        ForceMatchingTrainer(mapping, broken, network=None, progress=False).fit()


@pytest.mark.parametrize("backend", ["torch", "python"])
def test_independent_copies_in_one_system(ala2_cg, trained, backend):
    mapping, cg = ala2_cg
    potential = trained[0]
    x, _ = _positions(cg, [3, 300, 600])
    system = create_cg_system(mapping, potential, backend=backend, n_copies=3)
    assert system.getNumParticles() == 18
    ctx = openmm.Context(system, openmm.VerletIntegrator(1e-3), openmm.Platform.getPlatformByName("Reference"))
    ctx.setPositions(x.reshape(-1, 3))
    state = ctx.getState(getEnergy=True, getForces=True)
    e_model, f_model = potential.energy_and_forces(torch.tensor(x))
    assert state.getPotentialEnergy().value_in_unit(u.kilojoule_per_mole) == pytest.approx(float(e_model.sum()), rel=1e-6)
    np.testing.assert_allclose(state.getForces(asNumpy=True)._value, f_model.reshape(-1, 3).numpy(), rtol=1e-5, atol=1e-4)


def test_md_path_equals_autograd_of_forward(ala2_cg, trained):
    potential = trained[0]
    x = torch.tensor(_positions(ala2_cg[1], [10, 20, 30])[0], requires_grad=True)
    energy = potential(x)
    (grad,) = torch.autograd.grad(energy.sum(), x)
    md_energy, md_forces = potential.md_energy_and_forces(x.detach())
    torch.testing.assert_close(md_energy.detach(), energy.detach(), rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(md_forces.detach(), -grad, rtol=1e-10, atol=1e-9)
    scripted = torch.jit.script(potential)
    torch.testing.assert_close(scripted.md_energy_and_forces(x.detach())[1].detach(), -grad, rtol=1e-10, atol=1e-9)


def test_network_basis_starts_at_a_low_quantile_of_the_training_pair_distances(ala2_cg, trained):
    """Default ``rbf_min_nm``: the 0.1 % quantile of the bead-pair distances (within the network cutoff) of the
    training frames, so the network is flat where the data are too sparse to constrain it."""
    from openmm_backmap.potential.trainer import NETWORK_BASIS_QUANTILE, pair_distance_quantile_nm

    mapping, cg = ala2_cg
    potential, trainer, _ = trained
    train = trainer._load()[0]["train"]["positions"]
    i, j = np.triu_indices(train.shape[1], k=1)
    d = np.linalg.norm(train[:, i] - train[:, j], axis=-1).ravel()
    d = d[d < trainer.network["cutoff_nm"]]
    expected = np.quantile(d, NETWORK_BASIS_QUANTILE, method="inverted_cdf")  # the ceil(qN)-th smallest
    assert pair_distance_quantile_nm(train, None, trainer.network["cutoff_nm"], NETWORK_BASIS_QUANTILE) == \
        pytest.approx(expected, abs=1e-12)
    assert pair_distance_quantile_nm(train, None, trainer.network["cutoff_nm"], 0.0) == pytest.approx(d.min())
    assert expected > d.min()
    # large data: evenly strided frames keep about max_distances distances
    cut = trainer.network["cutoff_nm"]
    stride = int(np.ceil(len(d) / (len(d) // 3)))
    sub = np.linalg.norm(train[::stride, i] - train[::stride, j], axis=-1).ravel()
    assert pair_distance_quantile_nm(train, None, cut, 0.5, max_distances=len(d) // 3) == pytest.approx(
        np.quantile(sub[sub < cut], 0.5, method="inverted_cdf"), abs=1e-12)
    with pytest.raises(ValueError, match="quantile"):
        pair_distance_quantile_nm(train, None, cut, 1.0)
    assert potential.metadata["network"]["rbf_min_nm"] == pytest.approx(np.floor(expected * 100) / 100)
    assert potential.networks[0].rbf_min == potential.metadata["network"]["rbf_min_nm"] > 0.1
    explicit = ForceMatchingTrainer(mapping, cg, network={**trainer.network, "rbf_min_nm": 0.0}, max_epochs=1,
                                    batch_size=64, progress=False)
    assert explicit.network["rbf_min_nm"] == 0.0  # an explicit value is kept


def test_network_exerts_no_force_below_its_basis():
    """Two beads: the SchNet energy is flat (zero force) well below ``rbf_min_nm`` and not flat above it."""
    from openmm_backmap.potential.schnet import SchNet

    torch.manual_seed(3)
    net = SchNet([0, 0], hidden=16, n_rbf=12, cutoff_nm=0.8, n_interactions=2, rbf_min_nm=0.35).double()
    spacing = (0.8 - 0.35) / 11

    def force(r):
        x = torch.tensor([[[0.0, 0.0, 0.0], [r, 0.0, 0.0]]], dtype=torch.float64, requires_grad=True)
        net(x).sum().backward()
        return abs(float(x.grad[0, 1, 0]))

    above = max(force(r) for r in np.linspace(0.4, 0.6, 9))
    below = max(force(r) for r in np.linspace(0.05, 0.35 - 5 * spacing, 9))
    assert above > 1e-3
    assert below < 1e-3 * above
