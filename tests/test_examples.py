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
