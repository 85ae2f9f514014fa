"""The openmm-backmap command line."""
import json
import subprocess
import sys

import numpy as np
import pytest
import yaml

from openmm_backmap.cli import main
from openmm_backmap.data import AADataset, CGDataset


def test_demo_runs_pipeline_and_summary_matches_data(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--ns", "0.02"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    with AADataset(out / "aa_reference.h5") as aa:
        assert aa.n_frames == 100 == summary["aa"]["frames"]  # 20 ps every 0.2 ps
        assert summary["aa"]["potential_energy_mean_kJ_mol"] == pytest.approx(aa.potential_energy.mean())
    with CGDataset(out / "cg_backbone-cb.h5") as cg:
        assert cg.n_atoms == 6 and cg.n_frames == 100
        xyz = cg.positions[:]
    bonds = summary["cg"]["bond_length_mean_std_nm"]
    assert len(bonds) == 5
    # ACE C - ALA N is a peptide bond: ~0.133 nm
    first = bonds["ACE:C-ALA:N"]
    assert first[0] == pytest.approx(np.linalg.norm(xyz[:, 1] - xyz[:, 0], axis=-1).mean(), rel=1e-5)
    assert 0.12 < first[0] < 0.145
    assert 250 < summary["aa"]["temperature_mean_K"] < 350
    for name in ("summary.md", "ramachandran_aa.png", "cg_bonds.png", "demo.config.yaml"):
        assert (out / name).exists(), name
    assert str(out.resolve()) in capsys.readouterr().out


def test_simulate_with_config_file_and_written_config(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump({"system": "alanine-dipeptide", "solvent": "vacuum", "ns": 0.004,
                                   "interval": 20, "out": str(tmp_path / "v.h5")}))
    assert main(["simulate", "--config", str(cfg), "--seed", "5"]) == 0
    used = yaml.safe_load((tmp_path / "v.config.yaml").read_text())
    assert used["solvent"] == "vacuum" and used["seed"] == 5 and used["interval"] == 20
    with AADataset(tmp_path / "v.h5") as ds:
        assert ds.n_frames == 100 and ds.settings["solvent"] == "vacuum"
    # refusing to clobber, then extending with --append
    assert main(["simulate", "--config", str(cfg)]) == 1
    assert main(["simulate", "--config", str(cfg), "--append", "--ns", "0.008"]) == 0
    with AADataset(tmp_path / "v.h5") as ds:
        assert ds.n_frames == 200 and len(np.unique(ds.step)) == 200


def test_errors_are_one_line_with_hint(tmp_path, capsys):
    assert main(["map", "--data", str(tmp_path / "missing.h5"), "--preset", "ca"]) == 1
    err = capsys.readouterr().err
    assert "error: no such trajectory file" in err and "hint:" in err and "Traceback" not in err
    bad = tmp_path / "bad.yaml"
    bad.write_text("nonsense_key: 3\n")
    assert main(["simulate", "--config", str(bad)]) == 1
    assert "unknown settings ['nonsense_key']" in capsys.readouterr().err


def test_help_shows_examples():
    out = subprocess.run([sys.executable, "-m", "openmm_backmap.cli", "simulate", "--help"],
                         capture_output=True, text=True)
    assert out.returncode == 0 and "openmm-backmap simulate --system" in out.stdout
