"""Stacked inference (all unit kinds' networks in one batched call per layer) against each kind's own modules."""
import numpy as np
import pytest
import torch

from openmm_backmap import systems
from openmm_backmap.backmap import TemporalBackmapper
from openmm_backmap.backmap._environment import Neighbors
from openmm_backmap.mapping import CGMapping

TOL = {"rtol": 1e-5, "atol": 1e-5}


@pytest.fixture(scope="module")
def chignolin_mapping():
    cln = systems.chignolin("obc2")
    return CGMapping.from_preset(cln.topology, "ca")


def _random_model(mapping, seed=0, **kw):
    """Residue units of chignolin (9 kinds of different sizes), every weight and template random (the decoder's last
    layer starts at zero, which would hide errors)."""
    model = TemporalBackmapper(mapping, hidden=32, latent_dim=4, n_layers=2, library_size=0, units="residue", **kw)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=g))
        for kind in model.kinds:
            kind.atom_template.copy_(0.2 * torch.randn(kind.atom_template.shape, generator=g))
            kind.bead_template.copy_(0.3 * torch.randn(kind.bead_template.shape, generator=g))
    return model.eval()


def _inputs(model, seed=1):
    """Per kind: a different number of units (1-3), their conditions, latents and local frame beads."""
    g = torch.Generator().manual_seed(seed)
    counts = [1 + k % 3 for k in range(len(model.kinds))]
    conds = [torch.randn(n, kind.decoder[0].in_features - kind.latent_dim, generator=g)
             for n, kind in zip(counts, model.kinds)]
    z = [torch.randn(n, kind.latent_dim, generator=g) for n, kind in zip(counts, model.kinds)]
    lb = [0.2 * torch.randn(n, kind.n_frame_beads, 3, generator=g) for n, kind in zip(counts, model.kinds)]
    return counts, conds, z, lb


@pytest.mark.parametrize("kw", [{"environment_cutoff_nm": 0.6, "environment_neighbors": 12, "environment_dim": 8},
                                {"latent_prior": "mixture"}])
def test_stacked_decoder_equals_each_kinds_decoder(chignolin_mapping, kw):
    from openmm_backmap.backmap._stacked import pad

    model = _random_model(chignolin_mapping, **kw)
    assert len(model.kinds) == 9 and len({k.n_atoms for k in model.kinds}) > 3
    counts, conds, z, lb = _inputs(model)
    stacked = model._stacked()
    squashed = model.kinds[0]._squash(pad(conds))
    got = stacked.decode(squashed, z, [kind.own_beads(b) for kind, b in zip(model.kinds, lb)], model.length_scale)
    for kind, c, zk, b, g in zip(model.kinds, conds, z, lb, got):
        want = kind.decode(c, zk, model.length_scale, b)
        assert want.abs().max() > 0.05  # the network is not a no-op here
        torch.testing.assert_close(g, want, **TOL)


def test_stacked_latent_prior_equals_each_kinds_prior(chignolin_mapping):
    from openmm_backmap.backmap._stacked import pad

    model = _random_model(chignolin_mapping)
    counts, conds, _, _ = _inputs(model)
    got = model._stacked().latent_distributions(model.kinds[0]._squash(pad(conds)), counts)
    want = [torch.cat(parts) for parts in zip(*(kind.latent_distribution(c) for kind, c in zip(model.kinds, conds)))]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **TOL)


def test_stacked_environment_embedding_equals_each_kinds(chignolin_mapping):
    model = _random_model(chignolin_mapping, environment_cutoff_nm=0.6, environment_neighbors=12, environment_dim=8)
    g = torch.Generator().manual_seed(2)
    n_types = model.kinds[0].environment_types
    envs = []
    for k in range(len(model.kinds)):  # different numbers of units and of points per kind, some points padding
        n, p = 1 + k % 3, 5 + k
        weight = torch.rand(n, p, generator=g)
        weight[:, -2:] = 0.0
        envs.append(Neighbors(0.5 * torch.randn(n, p, 3, generator=g, dtype=torch.float64),
                              torch.randint(n_types, (n, p), generator=g), weight.double()))
    got = model._stacked().embed(envs)
    for kind, env, e in zip(model.kinds, envs, got):
        torch.testing.assert_close(e, kind.embed_environment(env), **TOL)


def test_stacked_weights_follow_changes_of_the_model(chignolin_mapping):
    """Training after inference (or loading weights) must not leave the stacked copy stale."""
    from openmm_backmap.backmap._stacked import pad

    model = _random_model(chignolin_mapping, latent_prior="mixture")
    counts, conds, z, lb = _inputs(model)
    first = model._stacked()
    assert model._stacked() is first  # cached while nothing changes
    with torch.no_grad():
        model.kinds[4].decoder[-1].weight.mul_(-2.0)
        model.kinds[4].atom_template.add_(0.1)
    squashed = model.kinds[0]._squash(pad(conds))
    got = model._stacked().decode(squashed, z, [k.own_beads(b) for k, b in zip(model.kinds, lb)], model.length_scale)
    torch.testing.assert_close(got[4], model.kinds[4].decode(conds[4], z[4], model.length_scale, lb[4]), **TOL)


def test_backmapped_frames_are_cg_consistent_and_reproducible_with_candidates(chignolin_mapping):
    """End to end through ``decode_frames`` with several candidates per residue (the stacked decoder's repeated
    conditions): every decoded residue maps back onto its Cα bead, and the same seed gives the same frames."""
    cln = systems.chignolin("obc2")
    model = _random_model(chignolin_mapping, environment_cutoff_nm=0.6, environment_neighbors=12, environment_dim=8)
    xyz = np.asarray(cln.positions.value_in_unit(__import__("openmm").unit.nanometer))[model.atom_indices]
    with torch.no_grad():  # templates from the structure itself, so local frames are well defined
        for spec, kind in zip(model.layout.kinds, model.kinds):
            unit = torch.as_tensor(xyz[spec.atom_index[0]])
            frame_beads = torch.as_tensor(chignolin_mapping.map_positions(xyz[None])[0][spec.frame_bead_index[0]])
            centre = frame_beads.mean(0)
            kind.atom_template.copy_((unit - centre).float())
            kind.bead_template.copy_((frame_beads - centre).float())
        for kind in model.kinds:
            kind.decoder[-1].weight.mul_(0.01)  # random but small deviations from the templates
    model.link_geometry[:, 0], model.link_geometry[:, 1] = 0.15, 0.05
    beads = chignolin_mapping.map_positions(xyz[None])[0]
    frames = [model.chain(seed=5, candidates=4) for _ in range(2)]
    out = []
    for chain in frames:
        chain.previous = xyz
        out.append(np.stack([chain.step(beads + 0.01 * i) for i in range(3)]))
    np.testing.assert_array_equal(out[0], out[1])
    mapped = chignolin_mapping.map_positions(out[0])
    np.testing.assert_allclose(mapped, np.stack([beads + 0.01 * i for i in range(3)]), atol=1e-4)
