"""Every example script runs with small settings and produces what it promises."""
import subprocess
import sys
from pathlib import Path

import numpy as np

from openmm_backmap.data import AADataset, CGDataset
from openmm_backmap.mapping import CGMapping

EXAMPLES = Path(__file__).parent.parent / "examples"


def test_reference_data_example(tmp_path):
    out = tmp_path / "ex"
    proc = subprocess.run([sys.executable, str(EXAMPLES / "reference_data.py"), "--ns", "0.01", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "AA: 50 frames of 22 atoms" in proc.stdout
    with AADataset(out / "ala2_aa.h5") as aa, CGDataset(out / "ala2_cg.h5") as cg:
        mapping = CGMapping.load(out / "backbone-cb.yaml", aa.topology)
        np.testing.assert_allclose(cg.positions[:], mapping.map_positions(aa.positions[:].astype(float)), atol=1e-6)


def _run(script, *args):
    proc = subprocess.run([sys.executable, str(EXAMPLES / script), *map(str, args)], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_train_run_and_backmap_examples(tmp_path):
    """train_potential.py -> run_cg_with_backmapping.py -> backmap_offline.py, each with tiny settings."""
    import mdtraj as md

    from openmm_backmap.backmap import TemporalBackmapper
    from openmm_backmap.formats import existing_steps
    from openmm_backmap.potential import CGPotential

    model = tmp_path / "model"
    out = _run("train_potential.py", "--aa-ns", "0.1", "--epochs", "1", "--hidden", "16", "--cg-steps", "200",
               "--out", model)
    assert "CG MD: 200 steps" in out
    assert CGPotential.load(model / "potential.pt").metadata["epochs"] == 1
    assert len((model / "training.csv").read_text().splitlines()) == 2

    run = tmp_path / "run"
    out = _run("run_cg_with_backmapping.py", "--aa", model / "ala2_aa.h5", "--potential", model / "potential.pt",
               "--epochs", "1", "--hidden", "32", "--ns", "0.004", "--out", run)
    assert "4 AA frames every 1 ps" in out  # 1000 steps of 4 fs, lag 1 ps = 5 AA frames of 0.2 ps
    assert TemporalBackmapper.load(run / "backmapper.pt").lag_ps == 1.0
    assert list(existing_steps(run / "aa.dcd")) == [250, 500, 750, 1000]
    assert md.load(str(run / "aa.dcd"), top=str(run / "aa.pdb")).n_atoms == 22

    offline = tmp_path / "offline"
    out = _run("backmap_offline.py", "--cg", run / "cg.dcd", "--backmapper", run / "backmapper.pt",
               "--reference", model / "ala2_aa.h5", "--out", offline)
    assert "aa.dcd: 4 frames of 22 atoms" in out and "aa_library.dcd: 4 frames of 22 atoms" in out
    library = md.load(str(offline / "aa_library.dcd"), top=str(offline / "aa_library.pdb"))
    assert np.isfinite(library.xyz).all()


def test_benzene_liquid_example(tmp_path):
    """benzene_liquid.py: NPT -> NVT data, CG potential, environment backmapper, CG run backmapped on the fly."""
    import mdtraj as md

    from openmm_backmap.backmap import TemporalBackmapper
    from openmm_backmap.formats import existing_steps

    out_dir = tmp_path / "benzene"
    out = _run("benzene_liquid.py", "--molecules", "40", "--cutoff-nm", "0.6", "--npt-ps", "1", "--aa-ps", "4",
               "--epochs", "2", "--cg-ps", "2", "--relax", "100", "--out", out_dir)
    with AADataset(out_dir / "aa.h5") as aa:
        assert aa.n_frames == 40 and aa.settings["pressure_bar"] == 1.0
        assert 0.6 < aa.settings["production_density_g_cm3"] < 1.1  # benzene: 0.87 g/cm3
        box = aa.box_vectors[-1]
    backmapper = TemporalBackmapper.load(out_dir / "backmapper.pt")
    assert backmapper.config["environment_cutoff_nm"] == 0.6 and backmapper.lag_ps == 0.1
    # 2 ps of 4 fs steps, one AA frame per 0.1 ps (25 steps), box written with every frame
    assert list(existing_steps(out_dir / "aa_run.dcd")) == list(range(25, 501, 25))
    run = md.load(str(out_dir / "aa_run.dcd"), top=str(out_dir / "aa_run.pdb"))
    assert run.n_atoms == 480 and run.topology.n_residues == 40
    np.testing.assert_allclose(run.unitcell_vectors[0], box, atol=1e-4)
    clash = float(out.split("intermolecular clash score ")[1].split()[0])
    assert clash < 0.05
    # --relax reached the reporter (what relaxation does is tested in test_relax.py and test_reporters.py; with a
    # 2-epoch CG potential the bead frames themselves leave no room for the AA molecules, so no quality bound here)
    above = float(out.split("molecules with an LJ energy above the AA maximum: ")[1].split("%")[0])
    assert "(frames relaxed)" in out and 0.0 <= above <= 100.0
