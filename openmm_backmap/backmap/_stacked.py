"""Inference with the networks of all unit kinds at once: one batched matrix product per layer.

A backmapper with residue units has one :class:`~openmm_backmap.backmap.model.KindModel` per residue kind (nine for
chignolin), each with its own environment embedding, latent prior and decoder. Evaluated kind by kind, a backmapped
frame costs about a hundred small PyTorch calls per kind, and the per-call overhead, not the arithmetic, sets the
latency. Here the kinds' MLPs (same depth and hidden width, inputs and outputs of different widths) are stacked
into zero-padded weight tensors ``(K, n_in, n_out)`` and run with one ``baddbmm`` per layer over inputs padded to
``(K, U_max, n_in)``: zero inputs meet zero weights, so every kind's output is exactly its own MLP's, up to
floating-point summation order. The per-kind modules remain the trained model (training, saving); this is a view of
their weights built for inference and rebuilt whenever a weight changes.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ._environment import Neighbors


def _linears(mlp: nn.Sequential) -> list[nn.Linear]:
    """The linear layers of an MLP made by ``model._mlp`` (Linear, SiLU, ..., Linear)."""
    mods = list(mlp)
    linears = mods[0::2]
    if not all(isinstance(m, nn.Linear) for m in linears) or not all(isinstance(m, nn.SiLU) for m in mods[1::2]):
        raise TypeError("stacked inference expects MLPs of alternating Linear and SiLU layers")
    return linears


class StackedMLP:
    """``K`` MLPs of equal depth evaluated as one.

    Parameters
    ----------
    mlps
        One ``nn.Sequential`` (Linear, SiLU, ..., Linear) per kind; hidden layers must have the same width.
    in_columns
        For each kind, the column of the padded input (of width ``n_in``) that each of its input features occupies.
    n_in
        Width of the padded input.
    """

    def __init__(self, mlps: Sequence[nn.Sequential], in_columns: Sequence[torch.Tensor], n_in: int) -> None:
        layers = [_linears(m) for m in mlps]
        depth = len(layers[0])
        if any(len(ls) != depth for ls in layers):
            raise ValueError("stacked MLPs must have the same depth")
        dtype, device = layers[0][0].weight.dtype, layers[0][0].weight.device
        self.weights: list[torch.Tensor] = []
        self.biases: list[torch.Tensor] = []
        self.n_out = [ls[-1].out_features for ls in layers]
        with torch.no_grad():
            for i in range(depth):
                n_out = max(ls[i].out_features for ls in layers)
                width = n_in if i == 0 else self.weights[-1].shape[2]
                w = torch.zeros(len(layers), width, n_out, dtype=dtype, device=device)
                b = torch.zeros(len(layers), 1, n_out, dtype=dtype, device=device)
                for k, ls in enumerate(layers):
                    lin = ls[i]
                    if i < depth - 1 and lin.out_features != n_out:
                        raise ValueError("stacked MLPs must have the same hidden width")
                    rows = in_columns[k] if i == 0 else slice(0, lin.in_features)
                    w[k, rows, :lin.out_features] = lin.weight.detach().T
                    b[k, 0, :lin.out_features] = lin.bias.detach()
                self.weights.append(w)
                self.biases.append(b)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """``(K, U, n_in)`` → ``(K, U, max n_out)`` (kind ``k``'s outputs in its first ``n_out[k]`` columns)."""
        last = len(self.weights) - 1
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            x = torch.baddbmm(b, x, w)
            if i < last:
                x = nn.functional.silu(x)
        return x


def pad(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Stack tensors ``(U_k, *shape_k)`` of equal rank into ``(K, max U_k, *max shape_k)``, zero-padded."""
    shape = [max(t.shape[d] for t in tensors) for d in range(tensors[0].dim())]
    out = torch.zeros(len(tensors), *shape, dtype=tensors[0].dtype, device=tensors[0].device)
    for k, t in enumerate(tensors):
        out[(k, *(slice(0, n) for n in t.shape))] = t
    return out


class StackedKinds:
    """The inference networks of all kinds of a :class:`~openmm_backmap.backmap.TemporalBackmapper`, stacked.

    Methods take and return per-kind lists (``U_k`` units of kind ``k``), so the callers' bookkeeping is unchanged.
    """

    def __init__(self, kinds: Sequence[nn.Module]) -> None:
        first = kinds[0]
        self.kinds = list(kinds)
        self.dtype = first.atom_template.dtype
        self.latent_dim = first.latent_dim
        self.n_cond = [k.decoder[0].in_features - k.latent_dim for k in kinds]
        c_max, d = max(self.n_cond), self.latent_dim
        self.decoder = StackedMLP([k.decoder for k in kinds],
                                  [torch.cat([torch.arange(c), c_max + torch.arange(d)]) for c in self.n_cond],
                                  c_max + d)
        self.prior = (StackedMLP([k.latent_prior for k in kinds], [torch.arange(c) for c in self.n_cond], c_max)
                      if first.latent_prior is not None else None)
        self.environment = None
        if first.environment is not None:
            n_feat = first.environment[0].in_features
            self.environment = StackedMLP([k.environment for k in kinds], [torch.arange(n_feat)] * len(kinds), n_feat)
        self.n_atoms = [k.n_atoms for k in kinds]
        with torch.no_grad():
            self.atom_template = pad([k.atom_template for k in kinds])  # (K, A, 3)
            self.consistency = pad([k.consistency for k in kinds])  # (K, A, P)
            self.bead_weights = pad([k.bead_weights for k in kinds])  # (K, P, A)

    def embed(self, envs: Sequence[Neighbors]) -> list[torch.Tensor]:
        """Each kind's :meth:`KindModel.embed_environment`, ``(U_k, environment_dim)``."""
        feats, weights = [], []
        for k, env in zip(self.kinds, envs):
            local = env.local.to(self.dtype) / k.environment_cutoff
            onehot = nn.functional.one_hot(env.types, k.environment_types).to(self.dtype)
            feats.append(torch.cat([local, local.norm(dim=-1, keepdim=True), onehot], dim=-1))
            weights.append(env.weight.to(self.dtype))
        x, w = pad(feats), pad(weights)  # (K, U, N, F), (K, U, N)
        n_kinds, n_units, n_points, n_feat = x.shape
        emb = self.environment(x.view(n_kinds, n_units * n_points, n_feat)).view(n_kinds, n_units, n_points, -1)
        emb = (emb * w.unsqueeze(-1)).sum(dim=2) / 8.0  # as KindModel.embed_environment
        return [emb[k, :len(f)] for k, f in enumerate(feats)]

    def latent_distributions(self, squashed_conds: torch.Tensor, counts: Sequence[int]):
        """Each kind's :meth:`KindModel.latent_distribution` for its squashed, padded conditions
        ``(K, U, max n_cond)``, concatenated over kinds: log weights ``(ΣU_k, M)``, means and log standard deviations
        ``(ΣU_k, M, latent_dim)``."""
        out = self.prior(squashed_conds)
        rows = torch.cat([out[k, :n] for k, n in enumerate(counts)])
        return self.kinds[0].split_prior(rows)

    def decode(self, squashed_conds: torch.Tensor, z: Sequence[torch.Tensor], own_beads: Sequence[torch.Tensor],
               scale: float) -> list[torch.Tensor]:
        """Each kind's :meth:`KindModel.decode`: squashed conditions padded to ``(K, U, max n_cond)`` (row ``u`` of
        kind ``k`` goes with ``z[k][u]``), latents ``(U_k, latent_dim)`` and the units' own local beads
        ``(U_k, n_beads_k, 3)``; returns local atoms ``(U_k, n_atoms_k, 3)`` in nm."""
        counts = [len(t) for t in z]
        x = torch.cat([squashed_conds[:, :max(counts)], pad(z)], dim=2)
        dev = self.decoder(x)
        n_kinds, n_units = dev.shape[:2]
        atoms = self.atom_template.unsqueeze(1) + scale * dev.view(n_kinds, n_units, -1, 3)
        shift = pad(own_beads) - self.bead_weights.unsqueeze(1) @ atoms
        atoms = atoms + self.consistency.unsqueeze(1) @ shift
        return [atoms[k, :n, :a] for k, (n, a) in enumerate(zip(counts, self.n_atoms))]
