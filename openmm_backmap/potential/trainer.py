"""Force matching (multiscale coarse-graining) of a CGPotential on mapped AA data.

The estimator is separate from the model it produces (``ForceMatchingTrainer(...).fit() -> CGPotential``).
Loss (thesis eq. 2.36; seed 004 eq. 6)::

    L = < |F_CG(R) - M_F(f)|^2 >  +  lambda < (U_CG(R) - (U_ref - <U_ref>))^2 >

with F_CG = -grad(U_priors + U_net) and the priors fitted first by Boltzmann inversion and then frozen, so the
network learns the difference between the mapped forces and the prior forces.  The energy term uses the
reference potential energy stored with each frame, centred on the training set; the potential's learned
``energy_offset`` absorbs the remaining constant.
"""
from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

from .._training import save_checkpoint, write_log
from .model import CGPotential
from .priors import fit_priors
from .neighbors import neighbor_pairs
from .schnet import SchNet
from .transfer import describe_units

#: Default network hyperparameters (SchNet).
DEFAULT_NETWORK = {"hidden": 64, "n_rbf": 32, "cutoff_nm": 0.8, "n_interactions": 3}
#: Default prior-fitting options (see :func:`openmm_backmap.potential.priors.fit_priors`).
DEFAULT_PRIORS = {"n_fourier": 3, "exclusion_bonds": 2, "exponent": 12}
#: Default start of the network's radial basis: this quantile of the bead-pair distances within its cutoff in
#: the training frames.  In the 300-molecule benzene box (1 bead per molecule, 1000 frames) that is 0.40 nm,
#: about two thousand pair samples below it; the single closest approach (0.35 nm) left the network free where
#: it had seen almost no data, and it built a spurious well there.
NETWORK_BASIS_QUANTILE = 1e-3


class ForceMatchingTrainer:
    """Fit a CG potential to mapped forces.

    Parameters
    ----------
    mapping
        The :class:`~openmm_backmap.mapping.CGMapping` that produced the CG data.
    dataset
        A :class:`~openmm_backmap.data.CGDataset` or its path (from :func:`~openmm_backmap.mapping.map_dataset`).
    network
        SchNet hyperparameters (``hidden``, ``n_rbf``, ``cutoff_nm``, ``n_interactions``, ``rbf_min_nm``, ...;
        missing keys take :data:`DEFAULT_NETWORK`), or ``None`` for a priors-only model.  Without
        ``rbf_min_nm`` the first radial basis function is put at the :data:`NETWORK_BASIS_QUANTILE` quantile
        of the bead-pair distances within the network's cutoff in the training frames (rounded down to
        0.01 nm): below it the network's filters fade to constants, so the network exerts no force on bead
        pairs closer than the data constrain it and the excluded-volume prior alone governs there.  An
        unrestricted network extrapolates into that region, and in liquids it tends to extrapolate
        attractively (it learns to cancel part of the prior's wall where there are data and carries that on
        where there are none): the one-bead benzene model of seed 004 collapsed that way in our benchmarks,
        and with the basis at the single closest approach it still built a well just above it
        (docs/liquids.md).  Pass ``rbf_min_nm=0.0`` for the plain SchNet basis.
    priors
        Options of the Boltzmann-inversion prior fit.
    energy_weight
        lambda of the energy term (seed 004 eq. 6), in (kJ/mol/nm)^2 per (kJ/mol)^2; 0 disables it.
    temperature_K
        Temperature of the reference data; default from the dataset's settings.
    batch_size, learning_rate, max_epochs, patience
        Adam with learning-rate halving on plateaus; early stopping after ``patience`` epochs without a better
        validation force loss; the best epoch's weights are returned.
    split, n_blocks, seed
        Train/validation/test fractions over ``n_blocks`` contiguous time blocks, and the seed of the split,
        the initial weights and the batch order.
    max_frames
        Use at most this many frames (evenly strided) of the dataset.
    dtype
        ``"float32"`` (default) or ``"float64"``.
    checkpoint
        File for the training state (written every epoch; ``fit(resume=True)`` continues from it).
    log
        CSV file with one row of losses per epoch.
    progress
        Show a progress bar.
    """

    def __init__(
        self,
        mapping: Any,
        dataset: Any,
        *,
        network: Optional[dict] = DEFAULT_NETWORK,
        priors: Optional[dict] = None,
        energy_weight: float = 0.0,
        temperature_K: Optional[float] = None,
        batch_size: int = 128,
        learning_rate: float = 1e-3,
        max_epochs: int = 100,
        patience: int = 10,
        split: Sequence[float] = (0.8, 0.1, 0.1),
        n_blocks: int = 10,
        seed: int = 0,
        max_frames: Optional[int] = None,
        dtype: str = "float32",
        checkpoint: str | os.PathLike | None = None,
        log: str | os.PathLike | None = None,
        progress: bool = True,
    ) -> None:
        if dtype not in ("float32", "float64"):
            raise ValueError(f"dtype must be 'float32' or 'float64', not {dtype!r}")
        for name, value in (("batch_size", batch_size), ("max_epochs", max_epochs), ("patience", patience)):
            if int(value) < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if not learning_rate > 0 or energy_weight < 0:
            raise ValueError("learning_rate must be > 0 and energy_weight >= 0")
        self.mapping = mapping
        self.dataset = dataset
        self.network = None if network is None else {**DEFAULT_NETWORK, **network}
        self.priors = {**DEFAULT_PRIORS, **(priors or {})}
        self.energy_weight = float(energy_weight)
        self.temperature_K = temperature_K
        self.batch_size = int(batch_size)
        self.learning_rate = float(learning_rate)
        self.max_epochs = int(max_epochs)
        self.patience = int(patience)
        self.split = tuple(split)
        self.n_blocks = int(n_blocks)
        self.seed = int(seed)
        self.max_frames = max_frames
        self.dtype = getattr(torch, dtype)
        self.checkpoint = Path(checkpoint) if checkpoint is not None else None
        self.log = Path(log) if log is not None else None
        self.progress = progress
        self.history: list[dict[str, float]] = []

    # -- data ------------------------------------------------------------------------------------------
    def _load(self):
        from ..data import CGDataset

        own = not isinstance(self.dataset, CGDataset)
        ds = CGDataset(self.dataset) if own else self.dataset
        try:
            settings = ds.settings
            fingerprint = settings.get("aa_topology_fingerprint")
            if fingerprint != self.mapping.topology_fingerprint or ds.n_atoms != self.mapping.n_beads:
                raise ValueError(f"{ds.path} was not mapped with this mapping ({ds.n_atoms} beads, AA fingerprint "
                                 f"{fingerprint}; the mapping has {self.mapping.n_beads} beads, "
                                 f"{self.mapping.topology_fingerprint})")
            if "forces" not in ds.fields:
                raise ValueError(f"{ds.path} stores no forces: force matching needs them")
            frames = np.arange(ds.n_frames)
            if self.max_frames is not None and ds.n_frames > self.max_frames:
                frames = np.linspace(0, ds.n_frames - 1, int(self.max_frames)).round().astype(int)
            parts = [frames[p] for p in _split(len(frames), self.split, self.n_blocks, self.seed)]
            data = {}
            for name, idx in zip(("train", "val", "test"), parts):
                pos = ds.positions[idx].astype(np.float64)
                forces = ds.forces[idx].astype(np.float64)
                for label, arr in (("positions", pos), ("forces", forces)):
                    bad = ~np.isfinite(arr).all(axis=(1, 2))
                    if bad.any():
                        raise ValueError(f"{ds.path}: NaN/inf {label} in frame {int(idx[np.argmax(bad)])}; "
                                         "refusing to train on it")
                data[name] = {
                    "positions": pos, "forces": forces, "energy": ds.potential_energy[idx],
                    "box": ds.box_vectors[idx].astype(np.float64) if ds.periodic else None, "frames": idx,
                }
            temperature = self.temperature_K or settings.get("temperature_K")
            if temperature is None:
                raise ValueError(f"{ds.path} records no temperature; pass temperature_K")
            return data, float(temperature), ds.periodic, str(ds.path)
        finally:
            if own:
                ds.close()

    # -- model -----------------------------------------------------------------------------------------
    def _build(self, train: dict, temperature: float, periodic: bool) -> CGPotential:
        top = self.mapping.cg_topology
        bonds = [[b[0].index, b[1].index] for b in top.bonds]
        types = list(self.mapping.bead_types)
        prior_terms = fit_priors(train["positions"], bonds, temperature, box=train["box"], bead_types=types,
                                 **self.priors)
        terms = list(prior_terms)
        if self.network is not None:
            network = dict(self.network)
            if "rbf_min_nm" not in network:
                start = pair_distance_quantile_nm(train["positions"], train["box"], float(network["cutoff_nm"]),
                                                  NETWORK_BASIS_QUANTILE, network.get("exclusions"))
                network["rbf_min_nm"] = math.floor(start * 100.0) / 100.0
            torch.manual_seed(self.seed)
            type_names = sorted(set(types))
            net = SchNet(n_types=len(type_names), bead_types=[type_names.index(t) for t in types], **network)
            last = [m for m in net.modules() if isinstance(m, torch.nn.Linear)][-1]
            torch.nn.init.zeros_(last.weight)  # start exactly at the priors-only model
            if last.bias is not None:
                torch.nn.init.zeros_(last.bias)
            terms.append(net)
        try:
            units = describe_units(self.mapping)
        except ValueError:  # a bead spans molecules: the potential cannot be transferred to other sizes
            units = None
        potential = CGPotential(
            terms, n_priors=len(prior_terms), bead_names=self.mapping.bead_names, bead_types=types,
            mapping_fingerprint=self.mapping.topology_fingerprint, periodic=periodic, units=units,
        ).to(self.dtype)
        for term in potential.priors:
            term.requires_grad_(False)
        return potential

    # -- training --------------------------------------------------------------------------------------
    def _losses(self, potential: CGPotential, batch: dict, energy_mean: float, create_graph: bool):
        x = batch["positions"].requires_grad_(True)
        energy = potential(x, batch["box"])
        (grad,) = torch.autograd.grad(energy.sum(), x, create_graph=create_graph)
        force_loss = ((-grad - batch["forces"]) ** 2).mean()
        energy_loss = ((energy - (batch["energy"] - energy_mean)) ** 2).mean()
        return force_loss, energy_loss

    def _tensors(self, part: dict, idx: np.ndarray | slice) -> dict:
        def t(a):
            return None if a is None else torch.as_tensor(a[idx], dtype=self.dtype)
        return {"positions": t(part["positions"]), "forces": t(part["forces"]), "energy": t(part["energy"]),
                "box": t(part["box"])}

    def _evaluate(self, potential: CGPotential, part: dict, energy_mean: float) -> tuple[float, float]:
        n = len(part["positions"])
        force, energy = 0.0, 0.0
        for start in range(0, n, 4 * self.batch_size):
            sl = slice(start, min(n, start + 4 * self.batch_size))
            f, e = self._losses(potential, self._tensors(part, sl), energy_mean, create_graph=False)
            force += f.item() * (sl.stop - sl.start)
            energy += e.detach().item() * (sl.stop - sl.start)
        return force / n, energy / n

    def fit(self, resume: bool = False) -> CGPotential:
        """Train and return the potential with the best validation force loss.

        Parameters
        ----------
        resume
            Continue from ``checkpoint`` (weights, optimizer, epoch, history) instead of starting anew.
        """
        from tqdm.auto import tqdm

        data, temperature, periodic, source = self._load()
        train, val = data["train"], data["val"]
        energy_mean = float(np.mean(train["energy"]))
        potential = self._build(train, temperature, periodic)
        params = [p for p in potential.parameters() if p.requires_grad]
        prior_val = self._evaluate(potential.priors_only().to(self.dtype), val, energy_mean)[0]
        best_state = {k: v.clone() for k, v in potential.state_dict().items()}
        best, stale, start_epoch = self._evaluate(potential, val, energy_mean)[0], 0, 0
        optimizer = torch.optim.Adam(params, lr=self.learning_rate) if params else None
        scheduler = (torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=0.5, patience=max(1, self.patience // 3))
                     if optimizer else None)
        if resume:
            if self.checkpoint is None or not self.checkpoint.exists():
                raise FileNotFoundError(f"no checkpoint to resume from: {self.checkpoint}")
            state = torch.load(self.checkpoint, map_location="cpu", weights_only=True)
            potential.load_state_dict(state["model"])
            best_state = state["best_model"]
            if optimizer is not None:
                optimizer.load_state_dict(state["optimizer"])
                scheduler.load_state_dict(state["scheduler"])
            best, stale, start_epoch = float(state["best"]), int(state["stale"]), int(state["epoch"])
            self.history = [dict(zip(state["history_keys"], row)) for row in state["history"]]

        n_train = len(train["positions"])
        bar = tqdm(range(start_epoch, self.max_epochs if optimizer else start_epoch), desc="force matching",
                   unit="epoch", disable=not self.progress)
        for epoch in bar:
            t0 = time.perf_counter()
            order = torch.randperm(n_train, generator=torch.Generator().manual_seed(self.seed * 100003 + epoch))
            running, count = 0.0, 0
            for start in range(0, n_train, self.batch_size):
                idx = order[start: start + self.batch_size].numpy()
                f_loss, e_loss = self._losses(potential, self._tensors(train, idx), energy_mean, create_graph=True)
                loss = f_loss + self.energy_weight * e_loss if self.energy_weight else f_loss
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                running += f_loss.detach().item() * len(idx)
                count += len(idx)
            val_force, val_energy = self._evaluate(potential, val, energy_mean)
            scheduler.step(val_force)
            row = {"epoch": epoch + 1, "train_force_mse": running / count, "val_force_mse": val_force,
                   "val_energy_mse": val_energy, "lr": optimizer.param_groups[0]["lr"],
                   "seconds": time.perf_counter() - t0}
            self.history.append(row)
            if not math.isfinite(val_force):
                raise RuntimeError(f"training diverged at epoch {epoch + 1} (validation loss {val_force})")
            if val_force < best:
                best, stale = val_force, 0
                best_state = {k: v.clone() for k, v in potential.state_dict().items()}
            else:
                stale += 1
            bar.set_postfix(train=f"{row['train_force_mse']:.1f}", val=f"{val_force:.1f}", best=f"{best:.1f}")
            self._write_log()
            self._save_checkpoint(potential, optimizer, scheduler, best_state, best, stale, epoch + 1)
            if stale >= self.patience:
                break
        potential.load_state_dict(best_state)
        test_force = self._evaluate(potential, data["test"], energy_mean)[0]
        potential.metadata.update({
            "trained_on": source, "temperature_K": temperature, "frames": {k: len(v["frames"]) for k, v in data.items()},
            "energy_weight": self.energy_weight, "priors": self.priors,
            "network": None if self.network is None else {
                k: v for k, v in potential.networks[0].config().items() if k not in ("bead_types", "exclusions")},
            "epochs": len(self.history), "val_force_mse": best, "test_force_mse": test_force,
            "priors_only_val_force_mse": prior_val, "energy_mean_kj_mol": energy_mean,
        })
        return potential

    def _write_log(self) -> None:
        write_log(self.log, self.history)

    def _save_checkpoint(self, potential, optimizer, scheduler, best_state, best, stale, epoch) -> None:
        save_checkpoint(self.checkpoint, potential, optimizer, scheduler, best_state, best, stale, epoch, self.history)


def pair_distance_quantile_nm(positions: Any, box: Any, cutoff_nm: float, quantile: float, exclusions: Any = None,
                              max_distances: int = 4_000_000, chunk: int = 64) -> float:
    """The ``quantile`` of the distances in nm between beads closer than ``cutoff_nm`` (minimum image; pairs in
    ``exclusions`` left out): the ``ceil(q N)``-th smallest of the ``N`` distances, ``0.0`` if there are none.

    Parameters
    ----------
    positions
        ``(F, n_beads, 3)`` positions in nm.
    box
        ``(F, 3, 3)`` box vectors in nm, or ``None``.
    cutoff_nm
        Only pairs closer than this count.
    quantile
        In ``[0, 1)``; ``0`` gives the closest approach.
    exclusions
        ``(E, 2)`` bead index pairs to leave out, or ``None``.
    max_distances
        Frames are taken evenly strided so that about this many distances are kept (all frames if fewer).
    """
    if not 0.0 <= quantile < 1.0:
        raise ValueError(f"quantile must lie in [0, 1); got {quantile}")
    x = torch.as_tensor(np.asarray(positions, dtype=np.float64))
    b = None if box is None else torch.as_tensor(np.asarray(box, dtype=np.float64)).reshape(-1, 3, 3)
    ex = None if exclusions is None or len(exclusions) == 0 else torch.as_tensor(np.asarray(exclusions), dtype=torch.long)

    def distances(index):
        frames = x[index]
        boxes = None if b is None else (b if len(b) == 1 else b[index])
        return neighbor_pairs(frames, cutoff_nm, boxes, ex)[4].numpy()

    first = distances(slice(0, min(chunk, len(x))))
    per_frame = max(len(first) / min(chunk, len(x)), 1.0)
    stride = max(1, math.ceil(len(x) * per_frame / max_distances))
    kept = [first] if stride == 1 else []
    frames = np.arange(chunk if stride == 1 else 0, len(x), stride)
    for start in range(0, len(frames), chunk):
        kept.append(distances(torch.as_tensor(frames[start:start + chunk])))
    d = np.concatenate(kept)
    if len(d) == 0:
        return 0.0
    k = max(1, math.ceil(quantile * len(d)))
    return float(np.partition(d, k - 1)[k - 1])


def _split(n: int, fractions: Sequence[float], n_blocks: int, seed: int):
    from ..data import block_split

    return block_split(n, fractions, n_blocks=min(n_blocks, n), seed=seed)
