"""Size transfer of a CG potential: the same molecules, another number of them (seed 004, §3.4).

A :class:`~.model.CGPotential` is made for the beads of one mapping: its priors hold index lists of those
beads.  Everything else is per bead type (the SchNet weights, the excluded-volume ``sigma`` per bead-type
pair, the bonded parameters, which :func:`~.priors.fit_priors` pools over interactions of equal bead types).
:func:`transfer_potential` rebuilds the index lists for another mapping of a system made of the same kinds of
molecule, e.g. a box 8x larger, and keeps all parameters.

Molecules are matched by :class:`openmm_backmap._units.UnitLayout`: a *unit* is a molecule that holds
beads, and units with the same residue and atom names, elements, bead types and bead weights are of the same
*kind*.  A potential records the kinds of its training mapping and which beads each unit holds
(:func:`describe_units`, stored as ``CGPotential.units``), so a transfer needs only the new mapping.
"""
from __future__ import annotations

import hashlib
import math
import warnings
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch

__all__ = ["describe_units", "transfer_potential"]

#: Pairs above which a transferred excluded volume without a cutoff (all pairs) warns.
ALL_PAIRS_WARNING = 2_000_000

#: Bonded priors whose interactions are copied term by term: index buffer and constructor argument, and the
#: per-interaction parameter buffers with their constructor arguments.
_BONDED = {
    "HarmonicBondPrior": ("bonds", {"r0_nm": "r0", "k_kj_mol_nm2": "k"}),
    "HarmonicAnglePrior": ("angles", {"theta0_rad": "theta0", "k_kj_mol_rad2": "k"}),
    "CosineAnglePrior": ("angles", {"coefficients_kj_mol": "coefficients"}),
    "FourierDihedralPrior": ("dihedrals", {"cos_coeffs": "cos_coeffs", "sin_coeffs": "sin_coeffs"}),
}


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def describe_units(mapping: Any) -> Dict[str, Any]:
    """JSON-serialisable record of the molecule kinds of ``mapping`` and the beads of every unit.

    Parameters
    ----------
    mapping
        A :class:`~openmm_backmap.mapping.CGMapping` whose beads each lie inside one molecule.

    Returns
    -------
    dict
        ``{"kinds": [{"name", "signature", "molecule", "n_beads", "bead_index"}, ...]}``, kinds in order of
        first appearance: ``signature`` is the SHA-256 of the :class:`~openmm_backmap._units.UnitLayout`
        signature (residue/atom names, elements, bead types, bead weights), ``molecule`` the SHA-256 of the
        residue/atom names and elements alone, and ``bead_index`` the ``(n_units, n_beads)`` global bead
        indices of every unit of the kind.

    Raises
    ------
    ValueError
        A bead spans more than one molecule.
    """
    from .._units import UnitLayout

    try:
        layout = UnitLayout(mapping)
    except ValueError as exc:
        raise ValueError(f"the mapping's molecules cannot be matched: {exc}") from exc
    top = mapping.aa_topology
    bead_types = list(mapping.bead_types)
    kinds = []
    for kind in layout.kinds:
        atoms = kind.atom_index[0]
        types = [bead_types[int(b)] for b in kind.bead_index[0]]
        signature = UnitLayout._signature(top, atoms, kind.weights, types)
        molecule = UnitLayout._signature(top, atoms, np.zeros((0, len(atoms))), [])
        kinds.append({"name": kind.name, "signature": _sha256(signature), "molecule": _sha256(molecule),
                      "n_beads": int(kind.n_beads), "bead_index": kind.bead_index.tolist()})
    return {"kinds": kinds}


class _Units:
    """Bead -> (kind, unit, position in the unit) of a :func:`describe_units` record."""

    def __init__(self, record: Dict[str, Any], n_beads: int) -> None:
        self.kinds = record["kinds"]
        self.bead_index = [np.asarray(k["bead_index"], dtype=np.int64).reshape(-1, k["n_beads"]) for k in self.kinds]
        self.kind = np.full(n_beads, -1, dtype=np.int64)
        self.unit = np.full(n_beads, -1, dtype=np.int64)
        self.local = np.full(n_beads, -1, dtype=np.int64)
        for k, index in enumerate(self.bead_index):
            if index.size and (index.min() < 0 or index.max() >= n_beads):
                raise ValueError(f"the unit record refers to bead {int(index.max())} of {n_beads}")
            self.kind[index] = k
            self.unit[index] = np.arange(len(index))[:, None]
            self.local[index] = np.arange(index.shape[1])[None, :]
        if (self.kind < 0).any():
            raise ValueError(f"bead {int(np.argmax(self.kind < 0))} belongs to no unit of the record")

    @property
    def n_units(self) -> int:
        return int(sum(len(index) for index in self.bead_index))

    def localize(self, rows: np.ndarray, what: str) -> Tuple[np.ndarray, np.ndarray]:
        """Kind ``(M,)`` and positions in the unit ``(M, w)`` of interactions ``rows (M, w)`` inside one unit."""
        rows = np.asarray(rows, dtype=np.int64)
        kind, unit = self.kind[rows], self.unit[rows]
        across = ((kind != kind[:, :1]) | (unit != unit[:, :1])).any(axis=1)
        if across.any():
            raise ValueError(f"{what} {rows[np.argmax(across)].tolist()} joins beads of two molecules; only "
                             "interactions inside molecules can be transferred")
        return kind[:, 0], self.local[rows]

    def template(self, values: np.ndarray) -> List[np.ndarray]:
        """Per kind, the values ``(n_beads_of_kind, ...)`` of a per-bead array at the kind's positions, checked
        to agree between all units of the kind."""
        out = []
        for index in self.bead_index:
            per_unit = values[index]
            if (per_unit != per_unit[:1]).any():
                return []
            out.append(per_unit[0])
        return out


def _canonical(paths: np.ndarray) -> List[Tuple[int, ...]]:
    """Each path or its reverse, whichever is smaller (bonds, angles and dihedrals do not change on reversal)."""
    return [min(tuple(p), tuple(p[::-1])) for p in paths.tolist()]


def _periodic(mapping: Any) -> bool:
    return mapping.to_openmm_topology().getPeriodicBoxVectors() is not None


class _Transfer:
    """Old units, new units, and the old kind of every new kind."""

    def __init__(self, old: _Units, new: _Units, match: List[int]) -> None:
        self.old, self.new, self.match = old, new, match

    def distinct(self, rows: np.ndarray, what: str) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The distinct interactions among ``rows (M, w)`` (old beads) per molecule kind: their kinds ``(D,)``
        and positions in the unit ``(D, w)``, and the distinct interaction ``(M,)`` of every row."""
        kind_of, local = self.old.localize(rows, what)
        unique: Dict[Tuple[int, Tuple[int, ...]], int] = {}
        label = np.array([unique.setdefault((int(k), path), len(unique))
                          for k, path in zip(kind_of, _canonical(local))], dtype=np.int64).reshape(-1)
        first = np.unique(label, return_index=True)[1]
        return kind_of[first], local[first], label

    def replicate(self, kind_of: np.ndarray, local: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """Every distinct interaction (kinds ``kind_of``, positions ``local``) in every new unit of its kind:
        new rows ``(R, w)`` and the distinct interaction ``(R,)`` each row copies."""
        rows, source = [], []
        for k_new, k_old in enumerate(self.match):
            chosen = np.flatnonzero(kind_of == k_old)
            index = self.new.bead_index[k_new]  # (units, beads of the kind)
            if len(chosen) and len(index):
                rows.append(index[:, local[chosen]].reshape(-1, local.shape[1]))
                source.append(np.tile(chosen, len(index)))
        if not rows:
            return np.zeros((0, local.shape[1]), dtype=np.int64), np.zeros(0, dtype=np.int64)
        return np.concatenate(rows), np.concatenate(source)

    def per_bead(self, values: np.ndarray, what: str) -> np.ndarray:
        """A per-bead array of the old beads carried to the new beads (through the position in the unit)."""
        template = self.old.template(values)
        if not template:
            raise ValueError(f"the {what} differs between equal beads of molecules of one kind; it is not per bead "
                             "type and cannot be transferred")
        return np.array([template[self.match[k]][j] for k, j in zip(self.new.kind, self.new.local)])

    def pairs(self, rows: Any, what: str) -> np.ndarray:
        """Pairs (bonds, exclusions) inside molecules, for the new beads."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1, 2)
        if not len(rows):
            return rows
        kind_of, local, _ = self.distinct(rows, what)
        return self.replicate(kind_of, local)[0]


def transfer_potential(potential: Any, mapping: Any, source_mapping: Any = None, *,
                       excluded_volume_cutoff_nm: Optional[float] = None) -> Any:
    """The potential for ``mapping``, a system made of the molecules it was trained on in other numbers.

    See :meth:`.model.CGPotential.transfer` (which calls this) for the rules.

    Parameters
    ----------
    potential
        The :class:`~.model.CGPotential` to transfer.
    mapping
        The :class:`~openmm_backmap.mapping.CGMapping` of the new system.
    source_mapping
        The mapping ``potential`` was made for; needed only when the potential records no units (saved by a
        version before size transfer, or built by hand).
    excluded_volume_cutoff_nm
        Cutoff (nm) given to an excluded-volume prior that has none.

    Returns
    -------
    CGPotential
        A new potential (the input is not changed), in the input's dtype and on its device.
    """
    from .model import CGPotential
    from .priors import ExcludedVolumePrior, NeighborExcludedVolumePrior
    from .schnet import SchNet

    if excluded_volume_cutoff_nm is not None and not (math.isfinite(excluded_volume_cutoff_nm)
                                                      and excluded_volume_cutoff_nm > 0):
        raise ValueError(f"excluded_volume_cutoff_nm must be positive; got {excluded_volume_cutoff_nm}")
    if source_mapping is not None:
        potential.check_mapping(source_mapping)
        record = describe_units(source_mapping)
    elif potential.units is not None:
        record = potential.units
    else:
        raise ValueError("this potential records no molecule kinds (made before size transfer, or by hand); "
                         "pass source_mapping=<the mapping it was trained for>")
    periodic = _periodic(mapping)
    if periodic != potential.periodic:
        raise ValueError(f"the potential is {'' if potential.periodic else 'not '}periodic but the mapping's topology "
                         f"{'has' if periodic else 'has no'} periodic box vectors; a potential transfers only to "
                         f"{'periodic' if potential.periodic else 'non-periodic'} systems")
    old = _Units(record, potential.n_beads)
    new_record = describe_units(mapping)
    new = _Units(new_record, mapping.n_beads)

    # every new kind must be a training kind: the same molecule with the same beads (types, atoms, weights)
    match = []
    by_signature = {k["signature"]: i for i, k in enumerate(old.kinds)}
    by_molecule = {k["molecule"] for k in old.kinds}
    trained = ", ".join(k["name"].split(":", 1)[-1] for k in old.kinds)
    for kind in new.kinds:
        if kind["signature"] in by_signature:
            match.append(by_signature[kind["signature"]])
            continue
        label = kind["name"].split(":", 1)[-1]
        if kind["molecule"] in by_molecule:
            raise ValueError(f"molecule {label} is mapped to other beads than in training (bead types, atoms or "
                             "weights differ); the potential was trained for this molecule with another mapping")
        raise ValueError(f"the mapping contains molecule {label} ({kind['n_beads']} beads), which this potential was "
                         f"never trained on (trained on: {trained}); a potential transfers only to systems made "
                         "of the molecules it was trained on")
    plan = _Transfer(old, new, match)
    if list(mapping.bead_types) != list(plan.per_bead(np.asarray(potential.bead_types, dtype=object), "bead type")):
        raise ValueError("the mapping's bead types differ from those the potential was trained for")

    averaged: List[str] = []
    terms: List[torch.nn.Module] = []
    for prior in potential.priors:
        name = type(prior).__name__
        if name in _BONDED:
            argument, parameters = _BONDED[name]
            kind_of, local, label = plan.distinct(prior.atoms.cpu().numpy(), argument[:-1])
            counts = np.bincount(label, minlength=len(kind_of))
            first = np.unique(label, return_index=True)[1]
            values = {}
            for arg, buffer in parameters.items():  # mean over the units of a kind (equal when pooled by type)
                data = getattr(prior, buffer).detach().double().cpu().numpy()
                total = np.zeros((len(kind_of),) + data.shape[1:])
                np.add.at(total, label, data)
                mean = total / counts.reshape((-1,) + (1,) * (data.ndim - 1))
                if np.array_equal(data, data[first][label]):
                    mean = data[first]  # bit for bit
                else:
                    averaged.append(f"{name}.{arg}")
                values[arg] = mean
            rows, source = plan.replicate(kind_of, local)
            if len(rows):
                terms.append(type(prior)(**{argument: rows, **{a: v[source] for a, v in values.items()}}))
        elif isinstance(prior, (ExcludedVolumePrior, NeighborExcludedVolumePrior)):
            terms.extend(_transfer_excluded_volume(prior, plan, excluded_volume_cutoff_nm))
        else:
            raise ValueError(f"cannot transfer a prior of class {name}")

    networks: List[torch.nn.Module] = []
    for net in potential.networks:
        if not isinstance(net, SchNet):
            raise ValueError(f"cannot transfer a network of class {type(net).__name__}")
        config = net.config()
        config["bead_types"] = plan.per_bead(np.asarray(config["bead_types"]), "network's type index").tolist()
        if config["exclusions"]:
            config["exclusions"] = plan.pairs(config["exclusions"], "network exclusion").tolist() or None
        weight = next(net.parameters())
        copy = SchNet(**config).to(device=weight.device, dtype=weight.dtype)  # load_state_dict keeps the dtype
        copy.load_state_dict(net.state_dict())
        networks.append(copy)

    scale = new.n_units / old.n_units
    source_info = {"mapping_fingerprint": potential.mapping_fingerprint, "n_beads": potential.n_beads,
                   "n_units": old.n_units, "n_units_new": new.n_units, "energy_offset_scale": scale,
                   "energy_offset_kj_mol": float(potential.energy_offset.detach())}
    if averaged:
        source_info["averaged_parameters"] = sorted(set(averaged))
    if excluded_volume_cutoff_nm is not None and any(isinstance(p, (ExcludedVolumePrior, NeighborExcludedVolumePrior))
                                                     and p.config()["cutoff_nm"] is None for p in potential.priors):
        source_info["excluded_volume_cutoff_nm"] = float(excluded_volume_cutoff_nm)
    result = CGPotential([*terms, *networks], n_priors=len(terms), bead_names=mapping.bead_names,
                         bead_types=list(mapping.bead_types), mapping_fingerprint=mapping.topology_fingerprint,
                         periodic=potential.periodic, energy_offset=float(potential.energy_offset.detach()) * scale,
                         metadata={**potential.metadata, "transferred_from": source_info}, units=new_record)
    result = result.to(device=potential.energy_offset.device, dtype=potential.energy_offset.dtype)
    return result.train(potential.training)


def _transfer_excluded_volume(prior: Any, plan: _Transfer, cutoff_nm: Optional[float]) -> List[torch.nn.Module]:
    """The excluded-volume prior for the new beads: the same rule (exclusions along the bonds inside each
    molecule), ``sigma`` per bead-type pair and exponent.  With a cutoff (the prior's, else ``cutoff_nm``) a
    :class:`~.priors.NeighborExcludedVolumePrior`, without one an :class:`~.priors.ExcludedVolumePrior` over
    all pairs.  Empty when no pair of the new beads' types has a ``sigma``."""
    from .priors import ExcludedVolumePrior, NeighborExcludedVolumePrior

    config = prior.config()
    if "pairs" in config:
        raise ValueError("an excluded-volume prior over an explicit pair list cannot be transferred; use the "
                         "exclusion rule (n_beads, bonds, exclusion_bonds) with sigma per bead-type pair")
    n_beads = len(plan.new.kind)
    cutoff = config["cutoff_nm"] if config["cutoff_nm"] is not None else cutoff_nm
    rule = {"n_beads": n_beads, "bonds": plan.pairs(config["bonds"], "excluded-volume bond").tolist(),
            "exclusion_bonds": config["exclusion_bonds"], "exponent": config["exponent"], "cutoff_nm": cutoff}
    cls = ExcludedVolumePrior if cutoff is None else NeighborExcludedVolumePrior
    if cutoff is None and n_beads * (n_beads - 1) // 2 > ALL_PAIRS_WARNING:
        warnings.warn(f"the excluded-volume prior has no cutoff, so it lists all {n_beads * (n_beads - 1) // 2:,} "
                      f"pairs of the {n_beads} beads (memory and time grow as the square of the box); pass "
                      "excluded_volume_cutoff_nm to search neighbours within a cutoff instead", RuntimeWarning,
                      stacklevel=4)
    sigma = np.asarray(config["sigma_nm"], dtype=np.float64)
    if config.get("bead_types") is None:
        if sigma.ndim and not np.all(sigma == sigma.flat[0]):
            raise ValueError("an excluded-volume prior with sigma per bead pair cannot be transferred; fit it with "
                             "bead types (sigma per bead-type pair)")
        return [cls(sigma_nm=float(sigma.flat[0]), **rule)]
    labels = list(config["bead_types"])
    names = list(dict.fromkeys(labels))  # the prior's type numbering: order of first appearance
    code = plan.per_bead(np.array([names.index(t) for t in labels], dtype=np.int64), "excluded-volume type")
    present = list(dict.fromkeys(code.tolist()))  # old type numbers in the new order of first appearance
    matrix = sigma[np.ix_(present, present)]
    if not (matrix > 0).any():
        return []
    return [cls(sigma_nm=matrix, bead_types=[names[c] for c in code], **rule)]
