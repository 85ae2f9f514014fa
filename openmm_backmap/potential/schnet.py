"""SchNet-type coarse-grained potential: continuous-filter convolutions over bead pairs, per-bead energies.

The architecture follows Schütt et al. (J. Chem. Phys. 148, 241722 (2018)) as used for CG force matching
in seed 004: bead-type embeddings are refined by ``n_interactions`` continuous-filter convolutions over
the pairs within the cutoff, an output MLP turns each bead's features into an energy, and the energies of
a configuration are summed.  Filters are built from a Gaussian radial basis of the pair distance and
multiplied by the envelope ``(cos(pi r / r_c) + 1) / 2``, which takes the energy and its first derivative
(the forces) smoothly to zero at the cutoff ``r_c``.  With ``rbf_min_nm > 0`` the envelope is also switched
on smoothly between ``rbf_min_nm - w`` and ``rbf_min_nm`` (``w``: the basis spacing), so bead pairs closer
than ``rbf_min_nm - w`` exchange no messages: the network exerts no force on them, and priors alone act
there.  Set ``rbf_min_nm`` to the closest approach in the training data (the trainer's default) so the
network cannot extrapolate to distances it has never seen.

By construction the energy is invariant to translations and rotations (it sees distances only), to
periodic images (minimum-image distances, see :mod:`.neighbors`) and to permutations of beads of the same
type (sums over pairs and beads).

Performance
-----------
``forward`` is a few dozen fused operations on all configurations at once: the filters of all
interactions come from one matrix product and one batched matrix product, and each interaction is one
gather, one scatter-add and three small matrix products (messages in both directions of a pair go through
a single gather/scatter).  Forces from autograd cost a backward pass through about 60 autograd nodes,
several µs each on a CPU; for small systems that overhead, not arithmetic, dominates.
:meth:`SchNet.energy_and_forces` computes the same forces with the chain rule written out, without
autograd (about 2.5x faster for 6 beads on one CPU core); use it in a ``TorchForce`` with
``setOutputsForces(True)``.  To add its forces to terms differentiated by autograd, add
``((positions - positions.detach()) * -forces).sum()`` to the energy: its value is 0 and its gradient is
``-forces`` (first derivatives only).
"""
import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from .neighbors import neighbor_pairs

__all__ = ["SchNet", "ShiftedSoftplus", "SiLU", "Tanh"]


class ShiftedSoftplus(torch.nn.Module):
    """``softplus(x) - log(2)``, which is 0 at 0 (SchNet's activation)."""

    def __init__(self) -> None:
        super().__init__()
        self.shift = math.log(2.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the activation element-wise."""
        return torch.nn.functional.softplus(x) - self.shift

    def derivative(self, x: torch.Tensor) -> torch.Tensor:
        """Element-wise derivative at ``x``."""
        return torch.sigmoid(x)


class SiLU(torch.nn.Module):
    """``x * sigmoid(x)``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the activation element-wise."""
        return torch.nn.functional.silu(x)

    def derivative(self, x: torch.Tensor) -> torch.Tensor:
        """Element-wise derivative at ``x``."""
        s = torch.sigmoid(x)
        return s * (1.0 + x * (1.0 - s))


class Tanh(torch.nn.Module):
    """``tanh(x)``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the activation element-wise."""
        return torch.tanh(x)

    def derivative(self, x: torch.Tensor) -> torch.Tensor:
        """Element-wise derivative at ``x``."""
        return 1.0 - torch.tanh(x) ** 2


def _activation(name: str) -> torch.nn.Module:
    """Activation module by name: ``"ssp"`` (shifted softplus), ``"silu"`` or ``"tanh"``."""
    if name == "ssp":
        return ShiftedSoftplus()
    if name == "silu":
        return SiLU()
    if name == "tanh":
        return Tanh()
    raise ValueError(f"unknown activation {name!r}; use 'ssp', 'silu' or 'tanh'")


class _Interaction(torch.nn.Module):
    """One continuous-filter convolution with its atom-wise layers (SchNet interaction block).

    The block maps bead features ``x (N, hidden)`` to an update ``v``; the caller adds it (residual
    connection).  ``filters (M, hidden)`` belong to the directed pairs ``source -> target`` (flat bead
    indices): bead ``target[m]`` receives ``filters[m] * in2f(x)[source[m]]``.
    """

    def __init__(self, hidden: int, activation: str) -> None:
        super().__init__()
        self.in2f = torch.nn.Linear(hidden, hidden, bias=False)
        self.f2out = torch.nn.Linear(hidden, hidden)
        self.act = _activation(activation)
        self.dense = torch.nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor, filters: torch.Tensor, source: torch.Tensor,
                target: torch.Tensor) -> torch.Tensor:
        """Feature update ``(N, hidden)``."""
        return self.dense(self.act(self._f2out(x, filters, source, target)[1]))

    def _f2out(self, x: torch.Tensor, filters: torch.Tensor, source: torch.Tensor,
               target: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``in2f(x)`` gathered at the sources, and the pre-activation ``f2out(pooled messages)``."""
        sent = self.in2f(x).index_select(0, source)
        pooled = torch.zeros_like(x).index_add_(0, target, sent * filters)
        return sent, self.f2out(pooled)

    def evaluate(self, x: torch.Tensor, filters: torch.Tensor, source: torch.Tensor,
                 target: torch.Tensor) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """Feature update and what :func:`_interaction_vjp` needs to differentiate it."""
        sent, z = self._f2out(x, filters, source, target)
        saved = [sent, self.act.derivative(z), self.dense.weight, self.f2out.weight, self.in2f.weight]
        return self.dense(self.act(z)), saved


def _interaction_vjp(grad: torch.Tensor, saved: List[torch.Tensor], filters: torch.Tensor,
                     source: torch.Tensor, target: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Chain rule through an interaction block with its residual, ``x + v(x, filters)``.

    ``grad (N, hidden)`` is the gradient with respect to ``x + v``, ``saved`` comes from
    :meth:`_Interaction.evaluate`.  Returns the gradients with respect to ``x`` and ``filters``.
    """
    sent, slope, dense_weight, f2out_weight, in2f_weight = saved
    grad_messages = (((grad @ dense_weight) * slope) @ f2out_weight).index_select(0, target)
    grad_y = torch.zeros_like(grad).index_add_(0, source, grad_messages * filters)
    return grad + grad_y @ in2f_weight, grad_messages * sent


class SchNet(torch.nn.Module):
    """SchNet-type CG potential of a fixed set of beads; energies in kJ/mol from positions in nm.

    Parameters
    ----------
    bead_types
        Type index of every bead, ``0 <= t < n_types``; fixes the number of beads.  Beads of the same type
        share an embedding and are interchangeable.
    n_types
        Number of bead types (embedding rows); default ``max(bead_types) + 1``.  Give it explicitly to share
        one type vocabulary between systems.
    hidden
        Width of the bead features and filters (the output MLP's hidden layer has ``hidden // 2``).
    n_rbf
        Number of Gaussian radial basis functions, centred evenly from ``rbf_min_nm`` to ``cutoff_nm`` with
        widths equal to their spacing.
    cutoff_nm
        Interaction cutoff in nm.  With periodic boxes it must not exceed half the smallest box height.
    n_interactions
        Number of interaction blocks (message-passing steps).
    rbf_min_nm
        Centre of the first radial basis function in nm.  Above 0, pairs closer than ``rbf_min_nm`` minus
        one basis spacing do not interact through the network (see the module docstring): set it to the
        closest approach of two beads in the training data.
    activation
        ``"ssp"`` (shifted softplus, as SchNet), ``"silu"`` or ``"tanh"``.
    exclusions
        Bead index pairs ``[i, j]`` whose direct interaction is left out (e.g. bonded neighbours handled
        by priors); they still see each other through other beads.  ``None`` keeps all pairs.

    Notes
    -----
    ``types``, ``exclusions`` and the RBF centres are buffers that the configuration defines; they are not
    part of the ``state_dict``, which holds the weights only.  The weights therefore carry over to any
    system of the same bead types (another bead order, a larger box): ``SchNet(**config)`` for the new
    system, then ``load_state_dict``.

    The network computes in the dtype of its parameters (``model.double()`` for float64) and returns
    energies and forces in the dtype of ``positions``.  The neighbour search is
    :func:`.neighbors.neighbor_pairs` (all pairs below 800 beads, a cell grid from 800 on).
    """

    def __init__(
        self,
        bead_types: Sequence[int],
        n_types: Optional[int] = None,
        hidden: int = 64,
        n_rbf: int = 32,
        cutoff_nm: float = 0.8,
        n_interactions: int = 3,
        rbf_min_nm: float = 0.0,
        activation: str = "ssp",
        exclusions: Optional[Sequence[Sequence[int]]] = None,
    ) -> None:
        super().__init__()
        types = [int(t) for t in bead_types]
        if not types:
            raise ValueError("bead_types is empty")
        n_types = max(types) + 1 if n_types is None else int(n_types)
        if min(types) < 0 or max(types) >= n_types:
            raise ValueError(f"bead types must lie in [0, {n_types})")
        if not 0.0 <= rbf_min_nm < cutoff_nm:
            raise ValueError("need 0 <= rbf_min_nm < cutoff_nm")
        if hidden < 2 or n_rbf < 1 or n_interactions < 1:
            raise ValueError("need hidden >= 2, n_rbf >= 1 and n_interactions >= 1")
        self.n_types = n_types
        self.hidden = int(hidden)
        self.n_rbf = int(n_rbf)
        self.cutoff = float(cutoff_nm)
        self.n_interactions = int(n_interactions)
        self.rbf_min = float(rbf_min_nm)
        self.activation = activation
        self.n_beads = len(types)

        self.register_buffer("types", torch.tensor(types, dtype=torch.long), persistent=False)
        pairs: Optional[torch.Tensor] = None
        if exclusions is not None and len(exclusions) > 0:
            pairs = torch.tensor([[int(i), int(j)] for i, j in exclusions], dtype=torch.long)
            if pairs.min() < 0 or pairs.max() >= self.n_beads or bool((pairs[:, 0] == pairs[:, 1]).any()):
                raise ValueError("exclusions must be pairs of distinct bead indices")
        self.register_buffer("exclusions", pairs, persistent=False)
        spacing = (self.cutoff - self.rbf_min) / max(self.n_rbf - 1, 1)
        self.register_buffer("rbf_centres", torch.linspace(self.rbf_min, self.cutoff, self.n_rbf), persistent=False)
        self.rbf_coefficient = -0.5 / spacing ** 2
        # (cos(pi r / r_c) + 1) / 2 = cos(pi r / (2 r_c))^2
        self.envelope_scale = 0.5 * math.pi / self.cutoff
        # inner switch (1 - cos(pi t)) / 2, t = (r - r_on) / w clipped to [0, 1], for rbf_min > 0 only
        self.inner_width = min(spacing, self.rbf_min) if self.rbf_min > 0.0 else 1.0
        self.inner_start = self.rbf_min - self.inner_width
        self.inner_switch = self.rbf_min > 0.0

        self.embedding = torch.nn.Embedding(n_types, self.hidden)
        # Filter networks of all interactions: one Linear to n_interactions * hidden, then one batched
        # product with (n_interactions, hidden, hidden) weights.
        self.filter_in = torch.nn.Linear(self.n_rbf, self.n_interactions * self.hidden)
        self.filter_act = _activation(activation)
        bound = 1.0 / math.sqrt(self.hidden)
        self.filter_weight = torch.nn.Parameter(
            torch.empty(self.n_interactions, self.hidden, self.hidden).uniform_(-bound, bound))
        self.filter_bias = torch.nn.Parameter(torch.empty(self.n_interactions, 1, self.hidden).uniform_(-bound, bound))
        self.interactions = torch.nn.ModuleList(
            [_Interaction(self.hidden, activation) for _ in range(self.n_interactions)])
        self.readout_hidden = torch.nn.Linear(self.hidden, self.hidden // 2)
        self.readout_act = _activation(activation)
        self.readout_out = torch.nn.Linear(self.hidden // 2, 1)

    @torch.jit.unused
    def config(self) -> Dict[str, Any]:
        """JSON-serialisable constructor arguments: ``SchNet(**model.config())`` rebuilds the architecture."""
        exclusions: Optional[List[List[int]]] = None
        if self.exclusions is not None:
            exclusions = [[int(i), int(j)] for i, j in self.exclusions.tolist()]
        return {
            "bead_types": [int(t) for t in self.types.tolist()],
            "n_types": self.n_types,
            "hidden": self.hidden,
            "n_rbf": self.n_rbf,
            "cutoff_nm": self.cutoff,
            "n_interactions": self.n_interactions,
            "rbf_min_nm": self.rbf_min,
            "activation": self.activation,
            "exclusions": exclusions,
        }

    def forward(self, positions: torch.Tensor, box: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Potential energies of configurations (forces by autograd).

        Parameters
        ----------
        positions
            ``(B, n_beads, 3)`` bead positions in nm.
        box
            ``(B, 3, 3)`` periodic box vectors in nm (rows a, b, c, OpenMM's reduced form; ``(3, 3)`` for one
            box shared by all configurations), or ``None``.

        Returns
        -------
        torch.Tensor
            ``(B,)`` energies in kJ/mol, dtype of ``positions``.
        """
        source, target, _, r = self._graph(positions, box)
        filters = self._filter_net(self._rbf(r)[0])[0] * self._envelope(r)
        filters = torch.cat([filters, filters], 1).unbind(0)
        x = self._embed(positions.shape[0])
        for k, interaction in enumerate(self.interactions):
            x = x + interaction(x, filters[k], source, target)
        energy = self.readout_out(self.readout_act(self.readout_hidden(x)))
        return energy.view(positions.shape[0], self.n_beads).sum(1).to(positions.dtype)

    @torch.jit.export
    def energy_and_forces(self, positions: torch.Tensor,
                          box: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """Energies and forces with the chain rule written out (no autograd; for MD, not for training).

        Parameters
        ----------
        positions
            ``(B, n_beads, 3)`` bead positions in nm.
        box
            ``(B, 3, 3)`` or ``(3, 3)`` periodic box vectors in nm, or ``None``.

        Returns
        -------
        energy : torch.Tensor
            ``(B,)`` energies in kJ/mol, as :meth:`forward`.
        forces : torch.Tensor
            ``(B, n_beads, 3)`` forces ``-dE/dr`` in kJ/mol/nm, dtype of ``positions``.
        """
        with torch.no_grad():
            pairs = neighbor_pairs(positions, self.cutoff, box, self.exclusions)
        return self.energy_and_forces_with_pairs(positions, pairs)

    @torch.jit.export
    def energy_and_forces_with_pairs(
        self, positions: torch.Tensor,
        pairs: Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """:meth:`energy_and_forces` over given pairs: those ``neighbor_pairs(positions, cutoff, box,
        exclusions)`` returns for this network's cutoff and exclusions (a search shared with other terms, see
        :func:`.neighbors.select_pairs`)."""
        with torch.no_grad():
            n_batch = positions.shape[0]
            source, target, displacement, r = self._pair_graph(positions, pairs)
            n_pairs = r.shape[0]
            rbf, centred = self._rbf(r)
            raw, z_filter = self._filter_net(rbf)
            envelope = self._envelope(r)
            filters = raw * envelope
            filters = torch.cat([filters, filters], 1).unbind(0)
            x = self._embed(n_batch)
            saved: List[List[torch.Tensor]] = []
            for k, interaction in enumerate(self.interactions):
                update, block_saved = interaction.evaluate(x, filters[k], source, target)
                saved.append(block_saved)
                x = x + update
            z_out = self.readout_hidden(x)
            energy = self.readout_out(self.readout_act(z_out)).view(n_batch, self.n_beads).sum(1)

            grad = (self.readout_out.weight * self.readout_act.derivative(z_out)) @ self.readout_hidden.weight
            grad_filters: List[torch.Tensor] = []
            for block in range(self.n_interactions - 1, -1, -1):
                grad, grad_directed = _interaction_vjp(grad, saved[block], filters[block], source, target)
                grad_filters.append(grad_directed)
            grad_filters.reverse()
            grad_both = torch.stack(grad_filters)  # (T, 2P, hidden): both directions of every pair
            grad_enveloped = grad_both[:, :n_pairs] + grad_both[:, n_pairs:]
            grad_raw = grad_enveloped * envelope
            grad_hidden = torch.bmm(grad_raw, self.filter_weight.transpose(1, 2)).transpose(0, 1)
            grad_hidden = grad_hidden.reshape(n_pairs, self.n_interactions * self.hidden)
            grad_rbf = (grad_hidden * self.filter_act.derivative(z_filter)) @ self.filter_in.weight
            envelope_slope = self._envelope_slope(r)
            grad_r = ((grad_rbf * rbf * centred).sum(-1, keepdim=True) * (2.0 * self.rbf_coefficient)
                      + (grad_enveloped * raw).sum((0, 2)).unsqueeze(-1) * envelope_slope)
            # dE/dr_j = -dE/dr_i; zero for coincident beads, as autograd through the norm
            pair_force = (grad_r / r.clamp(min=1e-12)).to(positions.dtype) * displacement
            forces = torch.zeros_like(positions).view(-1, 3)
            forces.index_add_(0, source[:n_pairs], pair_force).index_add_(0, target[:n_pairs], -pair_force)
            return energy.to(positions.dtype), forces.view(positions.shape)

    def _graph(self, positions: torch.Tensor,
               box: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Directed pairs ``source, target`` (flat bead indices, ``2P``: first ``i -> j`` for the ``P`` pairs
        ``i < j``, then ``j -> i``), displacements ``r_j - r_i (P, 3)`` and distances ``(P, 1)`` in the
        parameters' dtype."""
        return self._pair_graph(positions, neighbor_pairs(positions, self.cutoff, box, self.exclusions))

    def _pair_graph(self, positions: torch.Tensor,
                    pairs: Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]
                    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """:meth:`_graph` of the pairs found by a neighbour search."""
        if positions.shape[1] != self.n_beads:
            raise ValueError("positions must have shape (B, n_beads, 3) with the model's number of beads")
        batch, first, second, displacement, distance = pairs
        if positions.shape[0] > 1:
            offset = batch * self.n_beads
            first = first + offset
            second = second + offset
        r = distance.to(self.rbf_centres.dtype).unsqueeze(-1)
        return torch.cat([first, second]), torch.cat([second, first]), displacement, r

    def _rbf(self, r: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Gaussian radial basis ``(P, n_rbf)`` of distances ``r (P, 1)``, and ``r`` minus the centres."""
        centred = r - self.rbf_centres
        return torch.exp(self.rbf_coefficient * centred ** 2), centred

    def _envelope(self, r: torch.Tensor) -> torch.Tensor:
        """Envelope of distances ``r (P, 1)`` below the cutoff: ``cos(pi r / (2 r_c))^2``, times the inner
        switch when ``rbf_min_nm > 0``."""
        outer = torch.cos(r * self.envelope_scale) ** 2
        if not self.inner_switch:
            return outer
        t = ((r - self.inner_start) / self.inner_width).clamp(0.0, 1.0)
        return outer * (0.5 - 0.5 * torch.cos(math.pi * t))

    def _envelope_slope(self, r: torch.Tensor) -> torch.Tensor:
        """Derivative of :meth:`_envelope` with respect to ``r``."""
        outer_slope = -self.envelope_scale * torch.sin(2.0 * self.envelope_scale * r)
        if not self.inner_switch:
            return outer_slope
        t = ((r - self.inner_start) / self.inner_width).clamp(0.0, 1.0)
        inner = 0.5 - 0.5 * torch.cos(math.pi * t)
        inner_slope = (0.5 * math.pi / self.inner_width) * torch.sin(math.pi * t)
        return outer_slope * inner + torch.cos(r * self.envelope_scale) ** 2 * inner_slope

    def _filter_net(self, rbf: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Filters ``(n_interactions, P, hidden)`` of all interactions before the envelope, and the first
        layer's pre-activation ``(P, n_interactions * hidden)``."""
        z = self.filter_in(rbf)
        hidden = self.filter_act(z).view(-1, self.n_interactions, self.hidden).transpose(0, 1)
        filters = torch.baddbmm(self.filter_bias, hidden, self.filter_weight)
        return filters, z

    def _embed(self, n_batch: int) -> torch.Tensor:
        """Initial bead features ``(n_batch * n_beads, hidden)`` from the type embeddings."""
        return self.embedding(self.types).repeat(n_batch, 1)
