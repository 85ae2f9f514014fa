"""Import openmmtorch so that its OpenMM plugin is usable whatever the import order.

Two traps of the PyPI wheels (openmm 8.6.1, openmmtorch 1.5, torch 2.9.1):

* ``import openmmtorch`` before ``import torch`` fails (``libnvrtc.so.12`` not found): torch loads the
  CUDA runtime libraries that the openmmtorch extension links to.
* ``import openmm`` before ``import torch`` makes OpenMM's plugin loader fail on libOpenMMTorch*.so
  (libtorch not loaded yet).  The failure is silent: every TorchForce then raises "Specified a Platform for
  a Context which does not support all required kernels".  Loading the plugins again once torch is in
  memory fixes it.
"""
from __future__ import annotations

import os
from types import ModuleType

_ready = False


def import_openmmtorch() -> ModuleType:
    """Return the ``openmmtorch`` module with its OpenMM plugin loaded."""
    global _ready
    import torch  # noqa: F401  (must precede openmmtorch)
    import openmm
    import openmmtorch

    if not _ready:
        failed = [f for f in openmm.Platform.getPluginLoadFailures() if "OpenMMTorchReference" in f]
        if failed:
            plugins = os.path.join(openmm.version.openmm_library_path, "plugins")
            openmm.Platform.loadPluginsFromDirectory(plugins)
        _ready = True
    return openmmtorch
