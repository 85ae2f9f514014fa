"""Training of the temporally coherent backmapper (seed 003, §8.1.1, eqs. 8.2–8.6).

``BackmapperTrainer(mapping, aa_dataset, ...).fit() -> TemporalBackmapper``; the trainer is not the trained object.

Loss per training pair (r_{t-τ}, r_t) with CG frame R_t = M(r_t), all lengths in units of ``length_scale_nm``
(Å by default)::

    C = w_pos  <|r̂_t - r_t|²>                     (8.2, position reconstruction)
      + w_edm  <(EDM(r̂_t) - EDM(r_t))²>           (8.3, distance matrix within each unit)
      + w_bonded <(d̂_ij - d_ij)²> over 1-2 and 1-3 pairs (the local part of 8.3, weighted up: bond lengths
                                                      must be right to 10 %, and a constrained X–H bond has no
                                                      energy term in an OpenMM System to enforce it)
      + w_cg   <|M(r̂_t) - R_t|²>                  (8.4, CG consistency)
      + λ(e) w_energy huber((U(r̂_t) - U(r_t)) / kT)   (8.5, AA energy from the user's openmm.System)
      + β(e) KL(q(z | r_t, R_t, r_{t-τ}) | N(0, I))  (8.6)

λ grows exponentially from ``energy_start`` to 1 over ``energy_anneal_epochs`` (seed 003: "set to 0 at the
beginning ... annealed up to 1 using an exponential schedule"); the energy difference enters through a Huber
function of width ``energy_huber_kT`` (quadratic like eq. 8.5 near agreement, linear beyond) that grows only
logarithmically past 50 kT, so the astronomically high energies of early, clashing structures cannot dominate a
batch. β follows a cyclic schedule (Fu et al. 2019, as
seed 003 used for alanine dipeptide) when ``kl_cycles > 0``. Optional rollout training (``rollout_steps``) feeds
the model its own previous output for a few steps, the remedy for drift the thesis proposed as future work.
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
from .._physics import BOLTZMANN_KJ_MOL_K
from .._units import kabsch, minimum_image
from .model import DEFAULT_ARCHITECTURE, TemporalBackmapper, _within_two_bonds

#: Default weights of the loss terms.
DEFAULT_LOSS_WEIGHTS = {"position": 1.0, "distance": 1.0, "bonded": 30.0, "cg": 1.0, "energy": 0.01}


class BackmapperTrainer:
    """Fit a :class:`~openmm_backmap.backmap.TemporalBackmapper` to an AA trajectory.

    Parameters
    ----------
    mapping
        The :class:`~openmm_backmap.mapping.CGMapping` (CG frames are mapped from the AA frames on the fly).
    dataset
        An :class:`~openmm_backmap.data.AADataset` or its path; frames must be consecutive in time.
    energy
        The AA energy for the loss term: ``"dataset"`` (default: an :class:`~openmm_backmap.energy.AAEnergy` of the
        ``openmm.System`` stored in the dataset), an ``AAEnergy`` or ``openmm.System`` for the backmapped atoms, or
        ``None`` to train without the energy term.
    stride, lag_frames
        Use every ``stride``-th frame; training pairs are ``lag_frames`` used frames apart (τ = ``stride *
        lag_frames`` × the dataset's frame interval). Backmap CG frames saved at the same τ.
    architecture
        Constructor arguments of the model (``latent_dim``, ``hidden``, ``n_layers``, ``condition_on_previous``,
        ``length_scale_nm``); missing keys take :data:`~openmm_backmap.backmap.model.DEFAULT_ARCHITECTURE`.
        ``{"condition_on_previous": False}`` trains the frame-based baseline.
    loss_weights
        Weights of the ``position``, ``distance``, ``cg`` and ``energy`` terms (see the module docstring).
    beta, kl_cycles
        KL weight; with ``kl_cycles > 0`` it ramps from 0 to ``beta`` over the first half of each of ``kl_cycles``
        cycles spanning ``max_epochs`` (cyclic annealing), else it is constant.
    energy_anneal_epochs, energy_start, energy_huber_kT
        Energy-term schedule λ(e) = energy_start^(1 - e/energy_anneal_epochs) (capped at 1) and Huber width in kT.
    previous_noise_nm
        Gaussian noise (nm) added to the previous frame in training, so the model learns to correct small errors
        of its own previous outputs.
    rollout_steps
        Number of extra autoregressive steps per training sample fed with the model's own output (0: teacher
        forcing only).
    n_mixture, library_size
        Components of the latent Gaussian mixture; training frames kept in the seeding library.
    batch_size, learning_rate, max_epochs, patience
        Adam, learning-rate halving on plateaus, early stopping on the validation reconstruction loss.
    split, n_blocks, seed
        Train/validation/test fractions over contiguous time blocks (pairs never cross a block), and the seed of the
        split, the weights, the batches, the mixture and the library.
    max_frames
        Use at most this many (strided) frames, from the start of the dataset.
    temperature_K
        Temperature for kT; default from the dataset's settings.
    checkpoint, log, progress
        Training-state file (``fit(resume=True)`` continues from it), CSV log with one row per epoch, progress bar.
    """

    def __init__(
        self,
        mapping: Any,
        dataset: Any,
        *,
        energy: Any = "dataset",
        stride: int = 1,
        lag_frames: int = 1,
        architecture: Optional[dict] = None,
        loss_weights: Optional[dict] = None,
        beta: float = 0.01,
        kl_cycles: int = 4,
        energy_anneal_epochs: Optional[int] = None,
        energy_start: float = 1e-4,
        energy_huber_kT: float = 1.0,
        previous_noise_nm: float = 0.005,
        rollout_steps: int = 0,
        n_mixture: int = 10,
        library_size: int = 2000,
        batch_size: int = 128,
        learning_rate: float = 1e-3,
        max_epochs: int = 50,
        patience: int = 10,
        split: Sequence[float] = (0.8, 0.1, 0.1),
        n_blocks: int = 10,
        seed: int = 0,
        max_frames: Optional[int] = None,
        temperature_K: Optional[float] = None,
        checkpoint: str | os.PathLike | None = None,
        log: str | os.PathLike | None = None,
        progress: bool = True,
    ) -> None:
        for name, value in (("stride", stride), ("lag_frames", lag_frames), ("batch_size", batch_size),
                            ("max_epochs", max_epochs), ("patience", patience), ("n_mixture", n_mixture)):
            if int(value) < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if rollout_steps < 0 or library_size < 0 or beta < 0 or previous_noise_nm < 0:
            raise ValueError("rollout_steps, library_size, beta and previous_noise_nm must be >= 0")
        unknown = set(architecture or {}) - set(DEFAULT_ARCHITECTURE)
        if unknown:
            raise ValueError(f"unknown architecture keys {sorted(unknown)}; known: {sorted(DEFAULT_ARCHITECTURE)}")
        unknown = set(loss_weights or {}) - set(DEFAULT_LOSS_WEIGHTS)
        if unknown:
            raise ValueError(f"unknown loss_weights keys {sorted(unknown)}; known: {sorted(DEFAULT_LOSS_WEIGHTS)}")
        if (architecture or {}).get("latent_prior", "mixture") not in ("mixture", "conditional"):
            raise ValueError(f"latent_prior must be 'mixture' or 'conditional'; got {architecture['latent_prior']!r}")
        self.mapping, self.dataset, self.energy = mapping, dataset, energy
        self.stride, self.lag_frames = int(stride), int(lag_frames)
        self.architecture = {**DEFAULT_ARCHITECTURE, **(architecture or {})}
        self.loss_weights = {**DEFAULT_LOSS_WEIGHTS, **(loss_weights or {})}
        self.beta, self.kl_cycles = float(beta), int(kl_cycles)
        self.energy_anneal_epochs = int(energy_anneal_epochs or max(1, max_epochs // 2))
        self.energy_start, self.energy_huber_kT = float(energy_start), float(energy_huber_kT)
        self.previous_noise_nm, self.rollout_steps = float(previous_noise_nm), int(rollout_steps)
        self.n_mixture, self.library_size = int(n_mixture), int(library_size)
        self.batch_size, self.learning_rate = int(batch_size), float(learning_rate)
        self.max_epochs, self.patience = int(max_epochs), int(patience)
        self.split, self.n_blocks, self.seed = tuple(split), int(n_blocks), int(seed)
        self.max_frames, self.temperature_K = max_frames, temperature_K
        self.checkpoint = Path(checkpoint) if checkpoint is not None else None
        self.log = Path(log) if log is not None else None
        self.progress = progress
        self.history: list[dict[str, float]] = []

    # -- data ------------------------------------------------------------------------------------------
    def _load(self) -> dict:
        from ..data import AADataset, block_split

        own = not isinstance(self.dataset, AADataset)
        ds = AADataset(self.dataset) if own else self.dataset
        try:
            if ds.topology_fingerprint != self.mapping.topology_fingerprint or ds.n_atoms != self.mapping.n_atoms:
                raise ValueError(f"{ds.path} does not hold the AA system of this mapping ({ds.n_atoms} atoms, "
                                 f"fingerprint {ds.topology_fingerprint}; the mapping has {self.mapping.n_atoms} "
                                 f"atoms, {self.mapping.topology_fingerprint})")
            frames = np.arange(0, ds.n_frames, self.stride)
            if self.max_frames is not None:
                frames = frames[: int(self.max_frames)]
            min_frames = self.n_blocks * (self.lag_frames * (self.rollout_steps + 1) + 2)
            if len(frames) < min_frames:
                raise ValueError(f"{ds.path}: {len(frames)} usable frames; need at least {min_frames} for "
                                 f"{self.n_blocks} blocks with lag {self.lag_frames} and {self.rollout_steps} "
                                 "rollout steps")
            positions = ds.positions[frames].astype(np.float64)
            bad = ~np.isfinite(positions).all(axis=(1, 2))
            if bad.any():
                raise ValueError(f"{ds.path}: NaN/inf positions in frame {int(frames[np.argmax(bad)])}; "
                                 "refusing to train on it")
            box = ds.box_vectors[frames].astype(np.float64) if ds.periodic else None
            if box is not None:
                positions = self.mapping.make_molecules_whole(positions, box)
            beads = self.mapping.map_positions(positions)
            times = ds.time[frames]
            # Stored times are float32-rounded: keep 6 significant digits.
            lag_ps = float(f"{float(np.median(np.diff(times))) * self.lag_frames:.6g}") if len(times) > 1 else 0.0
            temperature = self.temperature_K or ds.settings.get("temperature_K")
            if temperature is None:
                raise ValueError(f"{ds.path} records no temperature; pass temperature_K")
            system = ds.system if self.energy == "dataset" else None
            parts = block_split(len(frames), self.split, n_blocks=self.n_blocks, seed=self.seed)
            block_of = np.empty(len(frames), dtype=np.int64)
            for b, idx in enumerate(np.array_split(np.arange(len(frames)), self.n_blocks)):
                block_of[idx] = b
            return {"positions": positions, "beads": beads, "box": box, "lag_ps": lag_ps,
                    "temperature": float(temperature), "system": system, "parts": parts, "block_of": block_of,
                    "source": str(ds.path), "frames": frames}
        finally:
            if own:
                ds.close()

    def _starts(self, part: np.ndarray, block_of: np.ndarray, rollout: int) -> np.ndarray:
        """Frame indices t such that t - lag, t, ..., t + rollout*lag lie in ``part`` and in one block."""
        lag = self.lag_frames
        member = np.zeros(len(block_of), dtype=bool)
        member[part] = True
        t = part[(part - lag >= 0) & (part + rollout * lag < len(block_of))]
        ok = member[t - lag] & (block_of[t - lag] == block_of[t])
        for k in range(1, rollout + 1):
            ok &= member[t + k * lag] & (block_of[t + k * lag] == block_of[t])
        return t[ok]

    def _energy_model(self, data: dict, model: TemporalBackmapper):
        from ..energy import AAEnergy

        energy = self.energy
        if energy is None:
            return None
        if energy == "dataset":
            energy = data["system"]
        if not isinstance(energy, AAEnergy):
            energy = AAEnergy(energy)
        if energy.n_atoms == self.mapping.n_atoms and model.n_atoms != self.mapping.n_atoms:
            energy = energy.subset(model.atom_indices)
        if energy.n_atoms != model.n_atoms:
            raise ValueError(f"the energy model has {energy.n_atoms} atoms but the backmapper outputs "
                             f"{model.n_atoms}; give an AAEnergy (or System) for the backmapped atoms")
        return energy

    # -- model -----------------------------------------------------------------------------------------
    def _templates(self, model: TemporalBackmapper, data: dict, rng: np.random.Generator) -> None:
        """Atom and frame-bead templates per kind: iterative superposition of the training units' atoms about the
        centroid of their frame beads; the frame-bead template is the mean of the frame beads superposed alike."""
        train = data["parts"][0]
        pick = rng.choice(train, size=min(len(train), 2000), replace=False)
        out = torch.as_tensor(data["positions"][pick][:, model.atom_indices])
        beads = torch.as_tensor(data["beads"][pick])
        for k, kind in enumerate(model.kinds):
            ub, ua = model.gather(k, beads, out)
            sel = torch.as_tensor(rng.choice(len(ub), size=min(len(ub), 5000), replace=False))
            centre = ub[sel].mean(dim=1, keepdim=True)
            x, xb = ua[sel] - centre, ub[sel] - centre
            template = x[0]
            for _ in range(6):
                rot = kabsch(x, template.expand_as(x))
                template = (x @ rot.transpose(-1, -2)).mean(dim=0)
            bead_template = (xb @ rot.transpose(-1, -2)).mean(dim=0)
            shift = bead_template.mean(dim=0)
            kind.atom_template.copy_((template - shift).float())
            kind.bead_template.copy_((bead_template - shift).float())

    def _unit_batches(self, model, beads, previous, target, box, generator, previous_beads=None):
        """Local frames, local coordinates and environments of the units of every kind in a batch of frames (one
        neighbour search per frame for all kinds)."""
        previous = previous if model.condition_on_previous else None
        frames = [model.unit_frames(k, beads, previous, box, generator, previous_beads)
                  for k in range(len(model.kinds))]
        envs: list = [None] * len(model.kinds)
        if model.environment_index is not None:
            envs = model.environment_index.neighbors_all([f[0] for f in frames], [f[1] for f in frames], beads,
                                                         previous, box)
        out = []
        for k, ((origin, rot, lb, lp, ubox), env) in enumerate(zip(frames, envs)):
            _, ut = model.gather(k, beads, target)
            out.append((origin, rot, lb, lp, model.kinds[k].to_local(ut, origin, rot, ubox), env))
        return out

    def _losses(self, model, energy, batch, generator, lam, beta, kT):
        """Loss terms of one batch; returns (total, dict of detached terms, last predictions)."""
        scale = model.length_scale
        w = self.loss_weights
        steps = batch["targets"]  # list of (B, n_atoms, 3): target of each rollout step
        previous = batch["previous"]
        terms = {"position": 0.0, "distance": 0.0, "bonded": 0.0, "cg": 0.0, "kl": 0.0, "energy": 0.0}
        total = 0.0
        for s, target in enumerate(steps):
            beads = batch["beads"][s]
            prev_in = previous
            if self.previous_noise_nm and model.condition_on_previous:
                prev_in = previous + self.previous_noise_nm * torch.randn(previous.shape, generator=generator,
                                                                          dtype=previous.dtype)
            pred_global = torch.zeros_like(target, dtype=torch.float32)
            pos = dist = bonded = cg = kl = 0.0
            n_kinds = len(model.kinds)
            prev_k = prev_in.detach() if s == 0 else prev_in
            prev_beads = model.previous_beads(prev_k if model.condition_on_previous else None, batch["box"])
            units = self._unit_batches(model, beads, prev_k, target, batch["box"], generator, prev_beads)
            for k, (kind, (origin, rot, lb, lp, lt, env)) in enumerate(zip(model.kinds, units)):
                lb, lt = lb.float(), lt.float()
                lp = lp.float() if lp is not None else None
                cond = kind.condition(lb, lp if kind.condition_on_previous else None, scale, env)
                mu, logvar = kind.encode(lt, cond, scale)
                z = mu + torch.exp(0.5 * logvar) * torch.randn(mu.shape, generator=generator)
                pred = kind.decode(cond, z, scale, lb)
                pos = pos + ((pred - lt) ** 2).mean() / scale ** 2 / n_kinds
                dp, dt = torch.cdist(pred, pred), torch.cdist(lt, lt)
                dist = dist + ((dp - dt) ** 2).mean() / scale ** 2 / n_kinds
                pi, pj = self._pairs[k]
                if len(pi):
                    bonded = bonded + ((dp[:, pi, pj] - dt[:, pi, pj]) ** 2).mean() / scale ** 2 / n_kinds
                cg = cg + ((kind.bead_weights @ pred - kind.own_beads(lb)) ** 2).mean() / scale ** 2 / n_kinds
                kl = kl + (-0.5 * (1 + logvar - mu ** 2 - logvar.exp()).sum(dim=1)).mean() / n_kinds
                glob = origin.float().unsqueeze(1) + pred @ rot.float().transpose(-1, -2)
                pred_global = _scatter_units(pred_global, model._unit_atoms[k], glob)
            ci, cj = self._cross_pairs
            if len(ci):  # residue units: bonds and angles between units, on the assembled frame
                box = batch["box"]
                dp = minimum_image(pred_global[:, cj] - pred_global[:, ci],
                                   box.unsqueeze(1).float() if box is not None else None).norm(dim=-1)
                dt = minimum_image(target[:, cj] - target[:, ci],
                                   box.unsqueeze(1) if box is not None else None).norm(dim=-1).float()
                bonded = bonded + ((dp - dt) ** 2).mean() / scale ** 2
            loss = w["position"] * pos + w["distance"] * dist + w["bonded"] * bonded + w["cg"] * cg + beta * kl
            e_term = torch.zeros(())
            if energy is not None and lam > 0 and w["energy"] > 0:
                box = batch["box"]
                u_pred = energy(pred_global.double(), box)
                with torch.no_grad():
                    u_ref = batch["energy"][s]
                e_term = _robust_energy_loss((u_pred - u_ref) / kT, self.energy_huber_kT).float()
                loss = loss + lam * w["energy"] * e_term
            total = total + loss / len(steps)
            for name, value in (("position", pos), ("distance", dist), ("bonded", bonded), ("cg", cg), ("kl", kl),
                                ("energy", e_term)):
                terms[name] += float(value.detach()) / len(steps) if torch.is_tensor(value) else 0.0
            previous = pred_global.double()
        return total, terms

    def _batch(self, data: dict, starts: np.ndarray, rollout: int, energy, ref_energy: dict) -> dict:
        lag = self.lag_frames
        atoms = self._atoms
        pos = data["positions"]
        targets, beads, energies = [], [], []
        for s in range(rollout + 1):
            t = starts + s * lag
            targets.append(torch.as_tensor(pos[t][:, atoms]))
            beads.append(torch.as_tensor(data["beads"][t]))
            if energy is not None:
                energies.append(torch.as_tensor(ref_energy["values"][t]))
        box = torch.as_tensor(data["box"][starts]) if data["box"] is not None else None
        return {"previous": torch.as_tensor(pos[starts - lag][:, atoms]), "targets": targets, "beads": beads,
                "energy": energies, "box": box}

    def _reference_energies(self, energy, data: dict, needed: np.ndarray) -> dict:
        values = np.full(len(data["positions"]), np.nan)
        if energy is None:
            return {"values": values}
        needed = np.unique(needed)
        with torch.no_grad():
            for start in range(0, len(needed), 512):
                idx = needed[start:start + 512]
                x = torch.as_tensor(data["positions"][idx][:, self._atoms])
                box = torch.as_tensor(data["box"][idx]) if data["box"] is not None else None
                values[idx] = energy(x, box).numpy()
        return {"values": values}

    def _evaluate(self, model, energy, data, starts, ref_energy, kT) -> dict:
        generator = torch.Generator().manual_seed(12345)
        sums: dict[str, float] = {}
        n = 0
        model.eval()
        with torch.no_grad():
            for start in range(0, len(starts), 4 * self.batch_size):
                idx = starts[start:start + 4 * self.batch_size]
                batch = self._batch(data, idx, 0, energy, ref_energy)
                _, terms = self._losses(model, energy, batch, generator, 1.0, 0.0, kT)
                for key, value in terms.items():
                    sums[key] = sums.get(key, 0.0) + value * len(idx)
                n += len(idx)
        model.train()
        return {k: v / n for k, v in sums.items()}

    def _schedules(self, epoch: float) -> tuple[float, float]:
        lam = min(1.0, self.energy_start ** max(0.0, 1.0 - epoch / self.energy_anneal_epochs))
        if self.kl_cycles > 0:
            period = self.max_epochs / self.kl_cycles
            phase = (epoch % period) / period
            beta = self.beta * min(1.0, 2.0 * phase)
        else:
            beta = self.beta
        return lam, beta

    # -- fit -------------------------------------------------------------------------------------------
    def fit(self, resume: bool = False) -> TemporalBackmapper:
        """Train and return the backmapper with the best validation reconstruction loss.

        Parameters
        ----------
        resume
            Continue from ``checkpoint`` (weights, optimizer, epoch, history) instead of starting anew.
        """
        from tqdm.auto import tqdm

        torch.manual_seed(self.seed)
        rng = np.random.default_rng(self.seed)
        data = self._load()
        model = TemporalBackmapper(self.mapping, n_mixture=self.n_mixture, library_size=0, lag_ps=data["lag_ps"],
                                   **self.architecture)
        self._atoms = model.atom_indices
        self._pairs = _local_pairs(self.mapping, model)
        self._cross_pairs = model.cross_pairs
        energy = self._energy_model(data, model)
        kT = BOLTZMANN_KJ_MOL_K * data["temperature"]
        train_part, val_part, test_part = data["parts"]
        train = self._starts(train_part, data["block_of"], self.rollout_steps)
        val = self._starts(val_part, data["block_of"], 0)
        test = self._starts(test_part, data["block_of"], 0)
        if min(len(train), len(val)) == 0:
            raise ValueError("no training or validation pairs: use more frames, fewer blocks or a shorter lag")
        needed = np.concatenate([train + s * self.lag_frames for s in range(self.rollout_steps + 1)] + [val, test])
        ref_energy = self._reference_energies(energy, data, needed)
        if energy is not None and not np.isfinite(ref_energy["values"][needed]).all():
            raise ValueError("the AA energy of some reference frames is not finite; check the system and the data")
        self._templates(model, data, rng)
        model.train()
        optimizer = torch.optim.Adam(model.parameters(), lr=self.learning_rate)
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=0.5,
                                                               patience=max(1, self.patience // 3))
        best, stale, start_epoch = math.inf, 0, 0
        best_state = {k: v.clone() for k, v in model.state_dict().items()}
        if resume:
            if self.checkpoint is None or not self.checkpoint.exists():
                raise FileNotFoundError(f"no checkpoint to resume from: {self.checkpoint}")
            state = torch.load(self.checkpoint, map_location="cpu", weights_only=True)
            model.load_state_dict(state["model"])
            best_state = state["best_model"]
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            best, stale, start_epoch = float(state["best"]), int(state["stale"]), int(state["epoch"])
            self.history = [dict(zip(state["history_keys"], row)) for row in state["history"]]
        generator = torch.Generator().manual_seed(self.seed)
        n_batches = max(1, math.ceil(len(train) / self.batch_size))
        if not resume:  # epoch 0: the untrained model (template + exact CG consistency), for reference in the log
            initial = self._evaluate(model, energy, data, val, ref_energy, kT)
            self.history = [{"epoch": 0, **{f"train_{k}": math.nan for k in initial},
                             **{f"val_{k}": v for k, v in initial.items()}, "val_score": math.nan,
                             "lambda": 0.0, "beta": 0.0, "lr": self.learning_rate, "seconds": 0.0}]
        bar = tqdm(range(start_epoch, self.max_epochs), desc="training backmapper", unit="epoch",
                   disable=not self.progress)
        for epoch in bar:
            t0 = time.perf_counter()
            generator.manual_seed(self.seed * 100003 + epoch)
            order = train[torch.randperm(len(train), generator=generator).numpy()]
            sums: dict[str, float] = {}
            for b in range(n_batches):
                lam, beta = self._schedules(epoch + b / n_batches)
                batch = self._batch(data, order[b * self.batch_size:(b + 1) * self.batch_size], self.rollout_steps,
                                    energy, ref_energy)
                loss, terms = self._losses(model, energy, batch, generator, lam, beta, kT)
                if not torch.isfinite(loss):
                    raise RuntimeError(f"training diverged at epoch {epoch + 1} (loss {float(loss)})")
                optimizer.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
                optimizer.step()
                for key, value in terms.items():
                    sums[key] = sums.get(key, 0.0) + value / n_batches
            val_terms = self._evaluate(model, energy, data, val, ref_energy, kT)
            w = self.loss_weights
            score = (w["position"] * val_terms["position"] + w["distance"] * val_terms["distance"]
                     + w["bonded"] * val_terms["bonded"] + w["cg"] * val_terms["cg"] + (w["energy"] * val_terms["energy"] if energy is not None else 0.0))
            annealed = lam >= 1.0 or energy is None
            if annealed:
                scheduler.step(score)
            row = {"epoch": epoch + 1, **{f"train_{k}": v for k, v in sums.items()},
                   **{f"val_{k}": v for k, v in val_terms.items()}, "val_score": score, "lambda": lam, "beta": beta,
                   "lr": optimizer.param_groups[0]["lr"], "seconds": time.perf_counter() - t0}
            self.history.append(row)
            # Models are compared only once the energy term has its full weight (earlier scores are not comparable).
            if score < best or (not annealed and epoch + 1 < self.max_epochs):
                best, stale = (score, 0) if annealed else (math.inf, 0)
                best_state = {k: v.clone() for k, v in model.state_dict().items()}
            else:
                stale += 1
            bar.set_postfix(pos=f"{val_terms['position']:.3f}", energy=f"{val_terms['energy']:.2f}",
                            best=f"{best:.3f}")
            self._write_log()
            self._save_checkpoint(model, optimizer, scheduler, best_state, best, stale, epoch + 1)
            if stale >= self.patience:
                break
        model.load_state_dict(best_state)
        self._fit_mixture(model, data, train, rng)
        if model.config["latent_prior"] == "conditional":
            self._fit_latent_prior(model, data, train, val, rng)
        self._fill_library(model, data, train_part, rng)
        self._fit_link_geometry(model, data, train_part, rng)
        test_terms = self._evaluate(model, energy, data, test, ref_energy, kT) if len(test) else {}
        model.metadata.update({
            "trained_on": data["source"], "temperature_K": data["temperature"], "lag_ps": data["lag_ps"],
            "pairs": {"train": int(len(train)), "val": int(len(val)), "test": int(len(test))},
            "test_frames": [int(i) for i in data["frames"][test_part[[0, -1]]]] if len(test_part) else [],
            "loss_weights": self.loss_weights, "beta": self.beta, "kl_cycles": self.kl_cycles,
            "rollout_steps": self.rollout_steps, "previous_noise_nm": self.previous_noise_nm,
            "epochs": len(self.history) - 1, "best_val_score": best, "test_losses": test_terms,
            "energy": None if energy is None else energy.describe(), "seed": self.seed,
        })
        model.eval()
        return model

    def _fit_mixture(self, model, data, train, rng) -> None:
        from sklearn.mixture import GaussianMixture

        per_frame = sum(int(idx.shape[0]) for idx in model._unit_atoms)
        generator = torch.Generator().manual_seed(self.seed)
        samples = self._posterior_samples(model, data, train, 20000 * per_frame, rng, generator, noise=False)
        for k, kind in enumerate(model.kinds):
            mu = samples[k][1].double().numpy()
            mu = mu[rng.choice(len(mu), size=min(len(mu), 50000), replace=False)]
            n_comp = min(self.n_mixture, len(mu))
            gmm = GaussianMixture(n_components=n_comp, covariance_type="full", reg_covar=1e-5,
                                  random_state=self.seed).fit(mu)
            weights = np.zeros(self.n_mixture)
            weights[:n_comp] = gmm.weights_
            means = np.zeros((self.n_mixture, mu.shape[1]))
            means[:n_comp] = gmm.means_
            tril = np.tile(np.eye(mu.shape[1]), (self.n_mixture, 1, 1))
            tril[:n_comp] = np.linalg.cholesky(gmm.covariances_)
            kind.mixture_weights.copy_(torch.as_tensor(weights))
            kind.mixture_means.copy_(torch.as_tensor(means))
            kind.mixture_scale_tril.copy_(torch.as_tensor(tril))

    def fit_latent_prior(self, backmapper: TemporalBackmapper) -> TemporalBackmapper:
        """A copy of a trained ``backmapper`` with a conditional latent prior (``latent_prior="conditional"``)
        fitted on this trainer's training pairs; encoder, decoder, templates and library are unchanged.

        This upgrades a model trained with ``latent_prior="mixture"`` (every file of format version 1 is one) without
        training it again, or refits the prior of a conditional one. Give the trainer
        the data, ``stride``, ``lag_frames``, ``max_frames``, ``split``, ``n_blocks`` and ``seed`` the model was
        trained with (its ``metadata``), so that the prior is fitted on the same training pairs.
        """
        backmapper.check_mapping(self.mapping)
        data = self._load()
        if backmapper.lag_ps and abs(data["lag_ps"] - backmapper.lag_ps) > 1e-3 * backmapper.lag_ps:
            raise ValueError(f"the trainer's pairs are {data['lag_ps']:g} ps apart but the backmapper was trained "
                             f"on {backmapper.lag_ps:g} ps; use the same stride and lag_frames")
        model = TemporalBackmapper(self.mapping, metadata=dict(backmapper.metadata),
                                   **{**backmapper.config, "latent_prior": "conditional"})
        state = backmapper.state_dict()
        for k, kind in enumerate(model.kinds):  # library sizes differ per kind
            for name in ("library_atoms", "library_beads"):
                setattr(kind, name, torch.zeros_like(state[f"kinds.{k}.{name}"]))
        result = model.load_state_dict(state, strict=False)
        if result.unexpected_keys or any(".latent_prior." not in key for key in result.missing_keys):
            raise ValueError(f"incompatible backmapper state: {result}")
        self._atoms = model.atom_indices
        rng = np.random.default_rng(self.seed)
        train = self._starts(data["parts"][0], data["block_of"], 0)
        val = self._starts(data["parts"][1], data["block_of"], 0)
        if min(len(train), len(val)) == 0:
            raise ValueError("no training or validation pairs: use more frames, fewer blocks or a shorter lag")
        self._fit_latent_prior(model, data, train, val, rng)
        model.eval()
        return model

    def _posterior_samples(self, model, data, starts, max_units, rng, generator, noise: bool = True):
        """Per kind: conditions ``(N, n_cond)``, posterior means and log variances ``(N, latent_dim)`` of the units
        of at most ``max_units`` units' worth of frames drawn from ``starts`` (with ``noise``, previous frames
        noised as in training)."""
        per_frame = sum(int(idx.shape[0]) for idx in model._unit_atoms)
        pick = np.sort(rng.choice(starts, size=min(len(starts), max(1, max_units // per_frame)), replace=False))
        out: list[list[list[torch.Tensor]]] = [[[], [], []] for _ in model.kinds]
        model.eval()
        with torch.no_grad():
            for start in range(0, len(pick), 256):
                batch = self._batch(data, pick[start:start + 256], 0, None, {"values": None})
                previous = batch["previous"]
                if noise and self.previous_noise_nm and model.condition_on_previous:
                    previous = previous + self.previous_noise_nm * torch.randn(previous.shape, generator=generator,
                                                                               dtype=previous.dtype)
                prev_beads = model.previous_beads(previous if model.condition_on_previous else None, batch["box"])
                units = self._unit_batches(model, batch["beads"][0], previous, batch["targets"][0], batch["box"],
                                           generator, prev_beads)
                for k, (kind, (_, _, lb, lp, lt, env)) in enumerate(zip(model.kinds, units)):
                    cond = kind.condition(lb.float(), lp.float() if kind.condition_on_previous else None,
                                          model.length_scale, env)
                    mu, logvar = kind.encode(lt.float(), cond, model.length_scale)
                    for slot, value in zip(out[k], (cond, mu, logvar)):
                        slot.append(value)
        return [tuple(torch.cat(slot) for slot in kind_out) for kind_out in out]

    def _fit_latent_prior(self, model, data, train, val, rng, max_units: int = 200_000, max_epochs: int = 200,
                          patience: int = 5) -> None:
        """Fit every kind's conditional prior p(z | condition) by maximum likelihood to samples of the encoder's
        posteriors q(z | atoms, condition) on training pairs (fresh samples every epoch); the epoch with the
        lowest validation negative log-likelihood is kept. Only the prior's weights change."""
        from tqdm.auto import tqdm

        generator = torch.Generator().manual_seed(self.seed + 7)
        model.eval()
        sets = {"train": self._posterior_samples(model, data, train, max_units, rng, generator),
                "val": self._posterior_samples(model, data, val, max(1000, max_units // 10), rng, generator)}
        nll_log = []
        for k, kind in enumerate(model.kinds):
            prior = kind.latent_prior
            optimizer = torch.optim.Adam(prior.parameters(), lr=1e-3)
            (cond, mu, logvar), (v_cond, v_mu, v_logvar) = sets["train"][k], sets["val"][k]
            v_z = v_mu + torch.exp(0.5 * v_logvar) * torch.randn(v_mu.shape, generator=generator)
            best, stale = math.inf, 0
            best_state = {n: t.clone() for n, t in prior.state_dict().items()}
            bar = tqdm(range(max_epochs), desc=f"latent prior, kind {k}", unit="epoch", disable=not self.progress)
            for epoch in bar:
                prior.train()
                z = mu + torch.exp(0.5 * logvar) * torch.randn(mu.shape, generator=generator)
                order = torch.randperm(len(z), generator=generator)
                for b in range(0, len(z), 1024):
                    idx = order[b:b + 1024]
                    loss = -kind.latent_log_prob(z[idx], cond[idx]).mean()
                    optimizer.zero_grad()
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(prior.parameters(), 10.0)
                    optimizer.step()
                prior.eval()
                with torch.no_grad():
                    nll = float(torch.cat([-kind.latent_log_prob(v_z[b:b + 8192], v_cond[b:b + 8192])
                                           for b in range(0, len(v_z), 8192)]).mean())
                bar.set_postfix(val_nll=f"{nll:.3f}")
                if nll < best:
                    best, stale = nll, 0
                    best_state = {n: t.clone() for n, t in prior.state_dict().items()}
                else:
                    stale += 1
                    if stale >= patience:
                        break
            prior.load_state_dict(best_state)
            nll_log.append({"kind": k, "val_nll": best, "train_units": int(len(cond)), "epochs": epoch + 1})
        model.metadata["latent_prior_fit"] = nll_log

    def _fill_library(self, model, data, train_part, rng) -> None:
        pick = np.sort(rng.choice(train_part, size=min(len(train_part), self.library_size), replace=False))
        atoms = torch.as_tensor(data["positions"][pick][:, model.atom_indices])
        beads = torch.as_tensor(data["beads"][pick])
        model.config["library_size"] = int(self.library_size)
        for k, kind in enumerate(model.kinds):
            ub, ua = model.gather(k, beads, atoms)
            sel = rng.choice(len(ub), size=min(len(ub), self.library_size), replace=False)
            ub, ua = ub[sel], ua[sel]
            centre = ub.mean(dim=1, keepdim=True)
            kind.library_atoms = (ua - centre).float()
            kind.library_beads = (ub - centre).float()

    def _fit_link_geometry(self, model, data, train_part, rng, max_frames: int = 5000) -> None:
        if len(model.cross_pairs[0]) == 0:
            return
        pick = np.sort(rng.choice(train_part, size=min(len(train_part), max_frames), replace=False))
        box = data["box"][pick] if data["box"] is not None else None
        model.fit_link_geometry(data["positions"][pick][:, model.atom_indices], box)

    def _write_log(self) -> None:
        write_log(self.log, self.history)

    def _save_checkpoint(self, model, optimizer, scheduler, best_state, best, stale, epoch) -> None:
        save_checkpoint(self.checkpoint, model, optimizer, scheduler, best_state, best, stale, epoch, self.history)


def _robust_energy_loss(x: torch.Tensor, delta: float, cap: float = 50.0) -> torch.Tensor:
    """Mean Huber loss of energy differences ``x`` (in kT) that grows only logarithmically beyond ``cap`` kT.

    Early in training a decoded structure can clash and have an energy 1e10 kT too high; with a Huber loss its
    gradient (δ · dU/dx) then dominates the clipped update and drives the coordinates away from the data. Past
    ``cap`` the gradient is δ · cap / |x| · dU/dx, i.e. relative, so such frames pull like frames at ``cap``.
    """
    a = x.abs()
    huber = torch.where(a <= delta, 0.5 * a * a, delta * (a - 0.5 * delta))
    at_cap = delta * (cap - 0.5 * delta)
    tail = at_cap + delta * cap * torch.log(torch.clamp(a, min=cap) / cap)
    return torch.where(a <= cap, huber, tail).mean()


def _local_pairs(mapping, model) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per kind, the unit-local index pairs ``(i, j)`` of atoms 1-2 or 1-3 apart in the bond graph."""
    reach = _within_two_bonds(mapping.aa_topology)
    out = []
    for kind in model.layout.kinds:
        atoms = kind.atom_index[0]
        local = reach[atoms][:, atoms].tocoo()
        keep = local.row < local.col
        out.append((torch.as_tensor(local.row[keep]), torch.as_tensor(local.col[keep])))
    return out


def _scatter_units(out: torch.Tensor, idx: torch.Tensor, units: torch.Tensor) -> torch.Tensor:
    """``out`` (B, n_atoms, 3) with the atoms ``idx`` (U, n) of every frame replaced by ``units`` (B*U, n, 3)."""
    flat = idx.reshape(-1)
    vals = units.reshape(out.shape[0], -1, 3)
    return out.index_copy(1, flat, vals.to(out.dtype))
