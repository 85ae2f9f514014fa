"""The backmapper's conditional latent prior p(z | condition): density, sampling, fitting, files, bad input."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from openmm_backmap.backmap import BackmapperTrainer, TemporalBackmapper
from openmm_backmap.backmap.model import KindModel
from openmm_backmap.data import AADataset

ARCH = {"hidden": 64, "latent_dim": 4, "n_layers": 2, "latent_prior": "conditional"}


def _kind(n_mixture: int = 3, latent_dim: int = 2, seed: int = 0) -> KindModel:
    torch.manual_seed(seed)
    kind = KindModel(n_atoms=4, n_beads=2, latent_dim=latent_dim, hidden=16, n_layers=1, condition_on_previous=True,
                     n_mixture=n_mixture, latent_prior="conditional")
    with torch.no_grad():  # the last layer starts at zero (a standard normal): give it random weights
        last = kind.latent_prior[-1]
        last.weight.normal_(0.0, 0.3)
        last.bias.normal_(0.0, 0.3)
    return kind


def test_density_is_the_mixture_of_diagonal_gaussians_it_describes():
    kind = _kind()
    cond = torch.randn(50, 3 * 2 + 3 * 4)
    z = torch.randn(50, 2) * 1.5
    log_w, means, log_std = kind.latent_distribution(cond)
    reference = torch.distributions.MixtureSameFamily(
        torch.distributions.Categorical(logits=log_w),
        torch.distributions.Independent(torch.distributions.Normal(means, log_std.exp()), 1))
    torch.testing.assert_close(kind.latent_log_prob(z, cond), reference.log_prob(z), rtol=1e-5, atol=1e-5)
    assert torch.allclose(log_w.exp().sum(dim=1), torch.ones(50))
    # the condition matters: another condition, another density
    assert not torch.allclose(kind.latent_log_prob(z, cond), kind.latent_log_prob(z, cond.flip(0)))


def test_untrained_prior_is_the_standard_normal():
    kind = KindModel(n_atoms=4, n_beads=2, latent_dim=3, hidden=16, n_layers=1, condition_on_previous=True,
                     latent_prior="conditional")
    cond, z = torch.randn(10, 18), torch.randn(10, 3)
    expected = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(dim=1)
    torch.testing.assert_close(kind.latent_log_prob(z, cond), expected, rtol=1e-5, atol=1e-5)


def test_samples_follow_the_conditional_mixture():
    """Moments of 40 000 samples per condition against the mixture's analytic mean and variance."""
    kind = _kind(n_mixture=2, latent_dim=2, seed=3)
    cond = torch.randn(2, 18).repeat_interleave(20000, dim=0)
    generator = torch.Generator().manual_seed(0)
    z = kind.sample_latent(len(cond), generator, cond).double()
    with torch.no_grad():
        log_w, means, log_std = (t.double() for t in kind.latent_distribution(cond[[0, 20000]]))
    w = log_w.exp().unsqueeze(-1)
    mean = (w * means).sum(dim=1)
    var = (w * (log_std.exp() ** 2 + means ** 2)).sum(dim=1) - mean ** 2
    for i, part in enumerate(z.split(20000)):
        se = (var[i] / 20000).sqrt()
        assert ((part.mean(dim=0) - mean[i]).abs() < 5 * se).all(), (part.mean(0), mean[i])
        assert torch.allclose(part.var(dim=0), var[i], rtol=0.06)
    again = kind.sample_latent(len(cond), torch.Generator().manual_seed(0), cond).double()
    torch.testing.assert_close(again, z)  # seeded


@pytest.fixture(scope="module")
def conditional_backmapper(adp_aa_data, adp_mapping):
    trainer = BackmapperTrainer(adp_mapping, adp_aa_data[1], max_epochs=4, batch_size=64, library_size=50,
                                architecture=ARCH, n_blocks=5, energy=None, progress=False, seed=1)
    return trainer, trainer.fit()


def _posterior(trainer, model, seed):
    data = trainer._load()
    val = trainer._starts(data["parts"][1], data["block_of"], 0)
    generator = torch.Generator().manual_seed(seed)
    cond, mu, logvar = trainer._posterior_samples(model, data, val, 10_000, np.random.default_rng(seed), generator)[0]
    return cond, mu, (mu + torch.exp(0.5 * logvar) * torch.randn(mu.shape, generator=generator)).double()


def test_trained_model_records_its_prior_fit(conditional_backmapper):
    trainer, model = conditional_backmapper
    fit = model.metadata["latent_prior_fit"]
    assert len(fit) == 1 and fit[0]["train_units"] > 0
    cond, _, z = _posterior(trainer, model, 5)
    with torch.no_grad():
        nll = float(-model.kinds[0].latent_log_prob(z.float(), cond).mean())
    nll_standard = float(-torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(1).mean())
    assert nll <= nll_standard + 0.05  # never worse than the N(0, I) it starts from (up to sampling noise)
    assert fit[0]["val_nll"] == pytest.approx(nll, abs=0.3)  # the recorded NLL is the held-out one


def test_fit_recovers_a_posterior_that_is_a_known_function_of_the_condition(conditional_backmapper):
    """With an encoder whose posterior mean is a fixed linear function of the previous frame (sigma 0.05), the
    fitted prior predicts that mean (R^2 > 0.8) and its held-out NLL is far below that of the best single
    Gaussian that ignores the condition (the samples' own mean and covariance)."""
    trainer, model = conditional_backmapper
    model = TemporalBackmapper.load(_saved(model))  # a copy: the fixture's model stays as trained
    kind = model.kinds[0]
    d, n_atoms, n_beads = kind.latent_dim, kind.n_atoms, kind.n_beads
    n_in = kind.encoder[0].in_features
    linear = torch.nn.Linear(n_in, 2 * d)
    with torch.no_grad():
        linear.weight.zero_()
        offset = 3 * n_atoms + 3 * n_beads  # the previous frame's part of the encoder input
        for j in range(d):
            linear.weight[j, offset + 5 * j: offset + 5 * j + 5] = 0.4
        linear.bias.zero_()
        linear.bias[d:] = 2 * np.log(0.05)
    kind.encoder = torch.nn.Sequential(linear)
    with torch.no_grad():
        kind.latent_prior[-1].weight.zero_()
        kind.latent_prior[-1].bias.zero_()
    trainer._fit_latent_prior(model, trainer._load(), *_train_val(trainer), np.random.default_rng(0))
    cond, mu, z = _posterior(trainer, model, 6)
    with torch.no_grad():
        nll = float(-kind.latent_log_prob(z.float(), cond).mean())
        log_w, means, _ = kind.latent_distribution(cond)
    predicted = (log_w.exp().unsqueeze(-1) * means).sum(dim=1).double()
    r2 = 1 - ((predicted - mu.double()) ** 2).sum(0) / ((mu.double() - mu.double().mean(0)) ** 2).sum(0)
    assert (r2 > 0.8).all(), r2
    gaussian = torch.distributions.MultivariateNormal(z.mean(0), covariance_matrix=torch.cov(z.T))
    nll_gaussian = float(-gaussian.log_prob(z).mean())  # fitted to the held-out samples themselves: optimistic
    assert nll < nll_gaussian - 2.0, (nll, nll_gaussian)


def _saved(model):
    import tempfile
    from pathlib import Path

    path = Path(tempfile.mkdtemp()) / "bm.pt"
    model.save(path)
    return path


def _train_val(trainer):
    data = trainer._load()
    return (trainer._starts(data["parts"][0], data["block_of"], 0),
            trainer._starts(data["parts"][1], data["block_of"], 0))


def test_chain_draws_from_the_conditional_prior(conditional_backmapper, adp_aa_data, adp_mapping, tmp_path):
    _, model = conditional_backmapper
    with AADataset(adp_aa_data[1]) as ds:
        aa = ds.positions[:6].astype(np.float64)
    cg = adp_mapping.map_positions(aa)
    out = model.backmap_trajectory(cg, seed=2, first_frame_nm=aa[0])
    assert out.shape == (6, 22, 3) and np.isfinite(out).all()
    error = np.linalg.norm(adp_mapping.map_positions(out) - cg, axis=-1)
    assert error.max() < 1e-4  # exact CG consistency holds whatever z is
    # the decoder's z comes from the conditional prior: swapping in a different prior changes the frames
    path = tmp_path / "bm.pt"
    model.save(path)
    loaded = TemporalBackmapper.load(path, adp_mapping)
    assert loaded.config["latent_prior"] == "conditional"
    np.testing.assert_array_equal(loaded.backmap_trajectory(cg, seed=2, first_frame_nm=aa[0]), out)
    with torch.no_grad():
        loaded.kinds[0].latent_prior[-1].bias.add_(3.0)
    assert np.abs(loaded.backmap_trajectory(cg, seed=2, first_frame_nm=aa[0])[1:] - out[1:]).max() > 1e-3


@pytest.fixture(scope="module")
def mixture_backmapper(adp_aa_data, adp_mapping):
    trainer = BackmapperTrainer(adp_mapping, adp_aa_data[1], max_epochs=2, batch_size=64, library_size=50,
                                architecture={**ARCH, "latent_prior": "mixture"}, n_blocks=5, energy=None,
                                progress=False, seed=1)
    return trainer.fit()


def test_the_default_prior_is_conditional(tiny_backmapper):
    assert tiny_backmapper.config["latent_prior"] == "conditional"
    assert tiny_backmapper.kinds[0].latent_prior is not None


def test_version_1_files_load_as_mixture_models(mixture_backmapper, tmp_path):
    """Files written before the conditional prior existed (format version 1, no ``latent_prior``, no ``units``, no
    ``link_geometry``) still load, as mixture models of molecule units."""
    tiny_backmapper = mixture_backmapper
    assert tiny_backmapper.kinds[0].latent_prior is None and "latent_prior_fit" not in tiny_backmapper.metadata
    path = tmp_path / "bm.pt"
    tiny_backmapper.save(path)
    blob = torch.load(path, weights_only=True)
    header = json.loads(blob["header"])
    assert header["format_version"] == 4 and header["config"]["latent_prior"] == "mixture"
    header["format_version"] = 1
    del header["config"]["latent_prior"], header["config"]["units"]
    blob["header"] = json.dumps(header)
    del blob["state_dict"]["link_geometry"]
    old = tmp_path / "v1.pt"
    torch.save(blob, old)
    loaded = TemporalBackmapper.load(old)
    assert loaded.config["latent_prior"] == "mixture" and loaded.kinds[0].latent_prior is None
    assert loaded.config["units"] == "molecule"
    cg = np.zeros((1, 6, 3)) + np.arange(6)[None, :, None] * 0.15 * np.array([1.0, 0.3, 0.1])
    np.testing.assert_array_equal(loaded.backmap_trajectory(cg, seed=0), tiny_backmapper.backmap_trajectory(cg, seed=0))


def test_bad_prior_settings_are_refused(adp_aa_data, adp_mapping):
    with pytest.raises(ValueError, match="latent_prior"):
        TemporalBackmapper(adp_mapping, latent_prior="gmm")
    with pytest.raises(ValueError, match="latent_prior"):
        BackmapperTrainer(adp_mapping, adp_aa_data[1], architecture={"latent_prior": "flow"})
    kind = _kind()
    with pytest.raises(ValueError, match="condition"):
        kind.sample_latent(3, torch.Generator().manual_seed(0))
    mixture = KindModel(n_atoms=4, n_beads=2, latent_dim=2, hidden=8, n_layers=1, condition_on_previous=True)
    with pytest.raises(ValueError, match="no conditional"):
        mixture.latent_distribution(torch.zeros(1, 18))


def test_a_mixture_model_gets_a_conditional_prior_without_retraining(mixture_backmapper, adp_aa_data, adp_mapping):
    tiny_backmapper = mixture_backmapper
    trainer = BackmapperTrainer(adp_mapping, adp_aa_data[1], n_blocks=5, energy=None, progress=False, seed=1)
    upgraded = trainer.fit_latent_prior(tiny_backmapper)
    assert upgraded.config["latent_prior"] == "conditional" and tiny_backmapper.config["latent_prior"] == "mixture"
    assert "latent_prior_fit" in upgraded.metadata and "latent_prior_fit" not in tiny_backmapper.metadata
    for name, value in tiny_backmapper.state_dict().items():  # everything else is the trained model's
        torch.testing.assert_close(upgraded.state_dict()[name], value, rtol=0, atol=0)
    other_lag = BackmapperTrainer(adp_mapping, adp_aa_data[1], n_blocks=5, lag_frames=2, progress=False)
    with pytest.raises(ValueError, match="ps apart"):
        other_lag.fit_latent_prior(tiny_backmapper)
