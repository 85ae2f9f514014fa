"""The pinned stack must load openmmtorch and evaluate a TorchForce on the CPU platform."""
import subprocess
import sys

import numpy as np
import openmm  # imported before torch on purpose: import_openmmtorch must repair the plugin loading
import pytest
import torch

from openmm_backmap._openmmtorch import import_openmmtorch


class _Harmonic(torch.nn.Module):
    """E = k * sum |x - x0|^2 (kJ/mol, nm)."""

    def __init__(self, k: float, x0: torch.Tensor) -> None:
        super().__init__()
        self.k = k
        self.register_buffer("x0", x0)

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        return self.k * torch.sum((positions - self.x0) ** 2)


@pytest.mark.parametrize("platform", ["Reference", "CPU"])
def test_torchforce_energy_and_forces_match_analytic(platform):
    rng = np.random.default_rng(1)
    x0 = rng.normal(size=(4, 3))
    x = rng.normal(size=(4, 3))
    k = 12.5
    module = torch.jit.script(_Harmonic(k, torch.tensor(x0)))
    system = openmm.System()
    for _ in range(4):
        system.addParticle(1.0)
    system.addForce(import_openmmtorch().TorchForce(module))
    context = openmm.Context(system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName(platform))
    context.setPositions(x)
    state = context.getState(getEnergy=True, getForces=True)
    energy = state.getPotentialEnergy().value_in_unit(openmm.unit.kilojoule_per_mole)
    forces = state.getForces(asNumpy=True).value_in_unit(openmm.unit.kilojoule_per_mole / openmm.unit.nanometer)
    np.testing.assert_allclose(energy, k * np.sum((x - x0) ** 2), rtol=1e-5)
    np.testing.assert_allclose(forces, -2 * k * (x - x0), rtol=1e-4, atol=1e-4)


def test_pinned_versions():
    major, minor = (int(v) for v in torch.__version__.split(".")[:2])
    assert (2, 8) <= (major, minor) < (2, 10), "openmmtorch 1.5 needs torch>=2.8,<2.10 (see setup.py)"
    assert hasattr(openmm, "PythonForce"), "the PythonForce backend needs OpenMM >= 8.5"


def test_openmm_imported_first_still_gets_torch_kernels(tmp_path):
    """In a fresh process: openmm first, then torch; the TorchForce must still evaluate."""
    code = (
        "import openmm, torch\n"
        "from openmm_backmap._openmmtorch import import_openmmtorch\n"
        "class M(torch.nn.Module):\n"
        "    def forward(self, x):\n"
        "        return (x ** 2).sum()\n"
        "s = openmm.System(); s.addParticle(1.0)\n"
        "s.addForce(import_openmmtorch().TorchForce(torch.jit.script(M())))\n"
        "c = openmm.Context(s, openmm.VerletIntegrator(1e-3), openmm.Platform.getPlatformByName('CPU'))\n"
        "c.setPositions([[1.0, 2.0, 3.0]])\n"
        "print(c.getState(getEnergy=True).getPotentialEnergy()._value)\n"
    )
    script = tmp_path / "order.py"  # TorchScript needs the source on disk
    script.write_text(code)
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert float(out.stdout.strip().splitlines()[-1]) == pytest.approx(14.0)
