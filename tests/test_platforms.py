"""Platform choice by system size and force types."""
import openmm
import pytest

from openmm_backmap import systems
from openmm_backmap.platforms import REFERENCE_MAX_PARTICLES, choose_platform


def test_small_native_systems_use_reference_others_cpu():
    assert choose_platform(systems.alanine_dipeptide("obc2").system).getName() == "Reference"
    assert choose_platform(systems.alanine_dipeptide("gbn2").system).getName() == "CPU"     # CustomGBForce
    assert choose_platform(systems.alanine_dipeptide("tip3p").system).getName() == "CPU"    # PME
    chignolin = systems.chignolin("obc2").system
    assert chignolin.getNumParticles() > REFERENCE_MAX_PARTICLES
    assert choose_platform(chignolin).getName() == "CPU"


def test_explicit_choice_and_errors():
    system = systems.alanine_dipeptide("vacuum").system
    assert choose_platform(system, "CPU").getName() == "CPU"
    platform = openmm.Platform.getPlatformByName("Reference")
    assert choose_platform(system, platform) is platform
    with pytest.raises(ValueError, match="not available"):
        choose_platform(system, "NoSuchPlatform")
