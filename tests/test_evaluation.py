"""evaluate_run and the HTML report on a short alanine-dipeptide reference: perfect scores for the reference itself,
failed targets for corrupted frames, clear errors for inputs that do not fit."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch  # noqa: F401  (before openmm)


@pytest.fixture(scope="module")
def adp_run(tmp_path_factory):
    """Reference dataset (600 frames, every 0.04 ps) plus trajectories derived from it."""
    import openmm
    import openmm.app as app
    from openmm import unit

    from openmm_backmap import systems
    from openmm_backmap.data import AADataset, simulate_reference
    from openmm_backmap.formats import AATrajectoryWriter
    from openmm_backmap.mapping import CGMapping

    folder = tmp_path_factory.mktemp("evaluation")
    adp = systems.alanine_dipeptide("obc2")
    ref_path = folder / "aa.h5"
    simulate_reference(ref_path, adp.topology, adp.system, adp.positions, n_steps=12_000, report_interval=20,
                       equilibration_steps=2000, seed=5, platform="Reference", progress=False)
    with AADataset(ref_path) as ds:
        xyz = ds.positions[:].astype(np.float64)
        steps, times = ds.step, ds.time
    mapping = CGMapping.from_preset(adp.topology, "backbone-cb")

    def write(path, frames, topology=adp.topology):
        with AATrajectoryWriter(path, topology, dt_ps=0.002) as writer:
            for x, s, t in zip(frames, steps, times):
                writer.write(x, int(s), float(t))
        return path

    same = write(folder / "same.dcd", xyz)
    rng = np.random.default_rng(0)
    noisy = write(folder / "noisy.dcd", xyz + rng.normal(0.0, 0.03, xyz.shape))
    cg = write(folder / "cg.dcd", mapping.map_positions(xyz), mapping.to_openmm_topology())

    # a real StateDataReporter log (format only: a short AA run stands in for the CG run)
    log = folder / "cg_log.csv"
    integrator = openmm.LangevinMiddleIntegrator(300 * unit.kelvin, 1 / unit.picosecond, 0.002 * unit.picosecond)
    integrator.setRandomNumberSeed(3)
    sim = app.Simulation(adp.topology, adp.system, integrator, openmm.Platform.getPlatformByName("Reference"))
    sim.context.setPositions(xyz[0])
    sim.context.setVelocitiesToTemperature(300 * unit.kelvin, 1)
    sim.reporters.append(app.StateDataReporter(str(log), 10, step=True, time=True, potentialEnergy=True,
                                               temperature=True))
    sim.step(300)
    del sim
    return {"adp": adp, "reference": ref_path, "xyz": xyz, "same": same, "noisy": noisy, "cg": cg, "log": log,
            "mapping": mapping, "folder": folder}


def _rows(result, subject="backmapped"):
    return {r["key"]: r for r in result["metrics"] if r["subject"] == subject}


def _check_report(result):
    html = Path(result["html"]).read_text(encoding="utf-8")
    data = json.loads(Path(result["json"]).read_text(encoding="utf-8"))
    for row in data["metrics"]:
        assert row["name"] in html.replace("&#x27;", "'")
    images = re.findall(r'<img src="([^"]+)"', html)
    assert images, "the report shows no figures"
    for src in images:
        assert not src.startswith(("http", "data:", "/")), src  # relative links to files next to the page
        assert (Path(result["html"]).parent / src).is_file(), src
    assert "How to read this" in html and "<script" not in html
    return html, data


def test_reference_against_itself_is_perfect(adp_run, tmp_path):
    from openmm_backmap.evaluation import evaluate_run

    result = evaluate_run(tmp_path / "same", reference=adp_run["reference"], backmapped=adp_run["same"],
                          baseline=adp_run["noisy"], cg_trajectory=adp_run["cg"], cg_log=adp_run["log"],
                          mapping=adp_run["mapping"])
    rows = _rows(result)
    assert rows["bond_score"]["value"] == 1.0
    assert rows["clash_score"]["value"] == 0.0
    assert abs(rows["energy_shift_kj_mol"]["value"]) < 1e-2
    assert rows["energy_jsd"]["value"] < 1e-3
    assert rows["fes_jsd"]["value"] < 1e-3
    assert rows["velocity_jsd"]["value"] < 1e-3
    assert rows["velocity_jsd_all_atoms"]["value"] < 1e-3
    # constrained X-H bonds have ~1e-6 nm wide histograms: DCD rounding (2e-8 nm) moves samples between bins
    assert rows["bonds_jsd_mean"]["value"] < 0.02 and rows["angles_jsd_mean"]["value"] < 1e-3
    assert any("constrained" in n for n in result["notes"])
    for key in ("bond_score", "clash_score", "energy_jsd", "energy_shift_kj_mol", "fes_jsd", "velocity_jsd_ratio"):
        assert rows[key]["passed"] is True, rows[key]
    # drift of the reference itself: first vs last 10 % of 24 ps (the trajectory differs between processes, and
    # 2.4 ps windows can differ by more than one σ), so only its bookkeeping is checked
    drift = result["details"]["backmapped"]["drift"]
    assert rows["drift_kj_mol"]["value"] == pytest.approx(drift["last_mean_kj_mol"] - drift["first_mean_kj_mol"])
    assert rows["drift_kj_mol"]["passed"] is (abs(rows["drift_kj_mol"]["value"]) <= drift["std_kj_mol"])
    # the reference's own drift is shown beside it (context, not judged): here the same frames, so the same value
    ref_drift = _rows(result, "AA reference")["drift_kj_mol"]
    assert ref_drift["passed"] is None and ref_drift["value"] == pytest.approx(rows["drift_kj_mol"]["value"], abs=0.05)
    # the corrupted baseline fails, so the ratio target is met by a wide margin
    base = _rows(result, "baseline")
    assert base["bond_score"]["passed"] is False and base["velocity_jsd"]["value"] > 0.1
    assert rows["velocity_jsd_ratio"]["value"] < 0.01
    # the CG trajectory is the mapped reference: identical CG distributions and φ/ψ surface
    cg = _rows(result, "CG run")
    assert cg["cg_bonds_jsd_mean"]["value"] < 1e-3 and cg["fes_jsd"]["value"] < 1e-3
    assert cg["fes_jsd"]["passed"] is None  # context, no target
    assert 150 < cg["cg_temperature_mean_K"]["value"] < 450
    html, data = _check_report(result)
    assert {"fes.png", "energy.png", "internal.png", "velocities.png", "cg_log.png", "cg_distributions.png"} <= {
        Path(f["path"]).name for f in data["figures"]}
    assert data["inputs"]["lag_ps"] == pytest.approx(0.04)
    assert data["details"]["reference"]["stored_energy_max_abs_diff_kj_mol"] < 0.1
    assert "✓" in html and "✗" in html
    assert "openmm" in data["versions"] and data["machine"]["cores"]


def test_corrupted_frames_fail_the_targets(adp_run, tmp_path):
    from openmm_backmap.evaluation import evaluate_run

    result = evaluate_run(tmp_path / "noisy", reference=adp_run["reference"], backmapped=adp_run["noisy"],
                          max_reference_frames=300)
    rows = _rows(result)
    assert rows["bond_score"]["value"] < 0.9 and rows["bond_score"]["passed"] is False
    assert rows["energy_shift_kj_mol"]["value"] > 100 and rows["energy_shift_kj_mol"]["passed"] is False
    assert rows["energy_jsd"]["passed"] is False
    assert rows["velocity_jsd"]["value"] > 0.1
    assert "velocity_jsd_ratio" not in rows  # no baseline, no ratio
    assert rows["bonds_jsd_mean"]["value"] > 0.1
    _, data = _check_report(result)
    assert data["inputs"]["reference_stride"] == 2 and data["inputs"]["reference_frames_used"] == 300
    # the stride-2 reference still gives speeds at the backmapped lag (pairs read at +1 frame)
    assert data["details"]["backmapped"]["velocity_jsd"] > 0.1
    assert "cg_log.png" not in {Path(f["path"]).name for f in data["figures"]}


def test_median_energy_shift_by_term_matches_openmm(adp_run, tmp_path):
    """The median shift and its split by term equal what OpenMM gives per force (each force in its own group)."""
    import openmm
    from openmm import unit

    from openmm_backmap.evaluation import evaluate_run
    from openmm_backmap.formats import AATrajectoryWriter

    adp, xyz = adp_run["adp"], adp_run["xyz"][:200]
    top = adp.topology
    names = [a.name for a in top.atoms()]
    ca, cb = names.index("CA"), names.index("CB")
    stretched = xyz.copy()  # the CA-CB bond 0.01 nm longer (CB moved along the bond) in every frame
    axis = xyz[:, cb] - xyz[:, ca]
    stretched[:, cb] += 0.01 * axis / np.linalg.norm(axis, axis=1, keepdims=True)
    path = tmp_path / "stretched.dcd"
    with AATrajectoryWriter(path, top, dt_ps=0.002) as writer:
        for k, x in enumerate(stretched):
            writer.write(x, 20 * (k + 1), 0.04 * (k + 1))
    result = evaluate_run(tmp_path / "stretched", reference=adp_run["reference"], backmapped=path,
                          max_reference_frames=200)
    details = result["details"]["backmapped"]

    system = openmm.XmlSerializer.clone(adp.system)
    groups = {}
    for i, force in enumerate(system.getForces()):
        force.setForceGroup(i)
        groups[type(force).__name__] = i
    context = openmm.Context(system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("Reference"))

    def energies(frames, group=None):
        out = []
        for x in frames:
            context.setPositions(x.astype(np.float32).astype(np.float64))  # as stored (DCD/HDF5 hold float32)
            state = context.getState(getEnergy=True, **({} if group is None else {"groups": {group}}))
            out.append(state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole))
        return np.array(out)

    ref = adp_run["xyz"][::3]  # the reference frames evaluate_run uses (600 frames, at most 200: every third)
    assert len(ref) == 200
    assert details["energy_median_shift_kj_mol"] == pytest.approx(
        np.median(energies(stretched)) - np.median(energies(ref)), abs=0.05)
    by_term = details["energy_median_shift_by_term_kj_mol"]
    for term, force in (("bond", "HarmonicBondForce"), ("angle", "HarmonicAngleForce"),
                        ("torsion", "PeriodicTorsionForce")):
        expected = np.median(energies(stretched, groups[force])) - np.median(energies(ref, groups[force]))
        assert by_term[term] == pytest.approx(expected, abs=0.05), term
    assert by_term["bond"] > 5  # 0.01 nm on a C-C bond of k ~ 2.6e5 kJ/mol/nm^2: ~13 kJ/mol
    row = _rows(result)["energy_median_shift_kj_mol"]
    assert row["passed"] is None and "bond" in row["note"]


def test_h5_backmapped_and_explicit_topology(adp_run, tmp_path):
    """An .h5 trajectory carries its topology; a PDB trajectory has no times, so the velocity JSD needs lag_ps."""
    from openmm_backmap.evaluation import evaluate_run
    from openmm_backmap.formats import AATrajectoryWriter

    xyz = adp_run["xyz"][:50]
    pdb = tmp_path / "frames.pdb"
    with AATrajectoryWriter(pdb, adp_run["adp"].topology) as writer:
        for k, x in enumerate(xyz):
            writer.write(x, 20 * (k + 1), 0.04 * (k + 1))
    result = evaluate_run(tmp_path / "pdb", reference=adp_run["reference"], backmapped=pdb)
    assert "velocity_jsd" not in _rows(result)
    assert any("lag_ps" in n for n in result["notes"])
    result = evaluate_run(tmp_path / "pdb_lag", reference=adp_run["reference"], backmapped=pdb, lag_ps=0.04)
    assert _rows(result)["velocity_jsd"]["value"] < 0.2
    assert _rows(result)["bond_score"]["value"] == 1.0


def test_atom_count_mismatch(adp_run, tmp_path):
    from openmm_backmap.evaluation import evaluate_run

    with pytest.raises(ValueError, match="atom count mismatch.*6 atoms.*22"):
        evaluate_run(tmp_path / "bad", reference=adp_run["reference"], backmapped=adp_run["cg"])


def test_missing_topology_pdb_next_to_dcd(adp_run, tmp_path):
    from openmm_backmap.evaluation import evaluate_run

    lonely = tmp_path / "lonely.dcd"
    shutil.copy(adp_run["same"], lonely)
    with pytest.raises(ValueError, match=r"lonely\.pdb"):
        evaluate_run(tmp_path / "bad", reference=adp_run["reference"], backmapped=lonely)
    # an explicit topology is enough; an open AADataset works as the reference and stays open
    from openmm_backmap.data import AADataset

    with AADataset(adp_run["reference"]) as ds:
        result = evaluate_run(tmp_path / "ok", reference=ds, backmapped=lonely,
                              backmapped_topology=adp_run["adp"].topology, max_reference_frames=100)
        assert ds.positions[0].shape == (22, 3)
    assert _rows(result)["bond_score"]["value"] == 1.0


def test_nan_and_empty_trajectories(adp_run, tmp_path):
    import h5py

    from openmm_backmap.evaluation import evaluate_run
    from openmm_backmap.formats import AATrajectoryWriter

    path = tmp_path / "nan.h5"
    with AATrajectoryWriter(path, adp_run["adp"].topology) as writer:
        for k, x in enumerate(adp_run["xyz"][:5]):
            writer.write(x, 20 * (k + 1), 0.04 * (k + 1))
    with h5py.File(path, "a") as f:
        f["coordinates"][3, 7, 1] = np.nan
    with pytest.raises(ValueError, match="NaN.*frame 3"):
        evaluate_run(tmp_path / "bad", reference=adp_run["reference"], backmapped=path)
    with h5py.File(path, "a") as f:
        for name in ("coordinates", "time", "step"):
            f[name].resize((0,) + f[name].shape[1:])
    with pytest.raises(ValueError, match="no frames"):
        evaluate_run(tmp_path / "bad", reference=adp_run["reference"], backmapped=path)


def test_state_log_and_targets(tmp_path):
    from openmm_backmap.evaluation import check_target, read_state_log

    log = tmp_path / "log.csv"
    log.write_text('#"Step","Time (ps)","Potential Energy (kJ/mole)","Temperature (K)"\n'
                   "100,0.4,-12.5,290.0\n200,0.8,-11.5,310.0\n#\"Step\",\"Time (ps)\"\n300,1.2,-10.0,300.0\n")
    data = read_state_log(log)
    assert data["Temperature (K)"].tolist() == [290.0, 310.0, 300.0]
    assert data["Step"].tolist() == [100, 200, 300]
    assert check_target("bond_score", 0.995) == ("≥ 0.99", True)
    assert check_target("energy_shift_kj_mol", -6.0)[1] is False
    assert check_target("drift_kj_mol", 3.0, scale=2.0)[1] is False
    assert check_target("drift_kj_mol", -1.5, scale=2.0)[1] is True
    assert check_target("energy_mean_kj_mol", 1.0) == (None, None)


def test_write_report_embeds_and_marks(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from openmm_backmap.report import write_report

    fig, ax = plt.subplots()
    ax.plot([0, 1], [0, 1])
    fig.savefig(tmp_path / "line.png")
    plt.close(fig)
    rows = [{"name": "good <score>", "value": 1.0, "target": "≥ 0.99", "passed": True},
            {"name": "bad", "value": float("nan"), "target": "≤ 1", "passed": False},
            {"name": "info", "value": 3, "unit": "K"}]
    page = write_report(tmp_path / "sub" / "r.html", title="T & t", embed=True, sections=[
        {"title": "Metrics", "metrics": rows}, {"title": "Figs", "figures": [
            {"path": tmp_path / "line.png", "caption": "a line"}, {"path": tmp_path / "gone.png", "caption": "x"}]}])
    html = page.read_text(encoding="utf-8")
    assert "good &lt;score&gt;" in html and "T &amp; t" in html
    assert "1 of 2" in html and "✓" in html and "✗" in html and "–" in html and "3 K" in html
    assert "data:image/png;base64," in html and "Figure missing" in html
