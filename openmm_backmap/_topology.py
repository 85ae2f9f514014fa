"""Lossless, JSON-friendly serialization of OpenMM topologies and a stable fingerprint.

Datasets, mappings and models store the topology they were made for in this form, so that a file made
for one molecule is refused when used with another.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any

import numpy as np
import openmm.app as app
from openmm import unit


def topology_to_dict(topology: app.Topology) -> dict[str, Any]:
    """Return a JSON-serialisable description of ``topology`` (chains, residues, atoms, bonds, box)."""
    chains = []
    for chain in topology.chains():
        residues = []
        for res in chain.residues():
            atoms = [
                [atom.name, atom.element.symbol if atom.element is not None else ""] for atom in res.atoms()
            ]
            residues.append({"name": res.name, "id": str(res.id), "atoms": atoms})
        chains.append({"id": str(chain.id), "residues": residues})
    bonds = [[b[0].index, b[1].index] for b in topology.bonds()]
    out: dict[str, Any] = {"chains": chains, "bonds": bonds}
    box = topology.getPeriodicBoxVectors()
    if box is not None:
        out["box_vectors"] = np.asarray(box.value_in_unit(unit.nanometer)).tolist()
    return out


def topology_from_dict(data: dict[str, Any]) -> app.Topology:
    """Inverse of :func:`topology_to_dict`."""
    top = app.Topology()
    atoms = []
    for chain_data in data["chains"]:
        chain = top.addChain(id=chain_data["id"])
        for res_data in chain_data["residues"]:
            res = top.addResidue(res_data["name"], chain, id=res_data["id"])
            for name, symbol in res_data["atoms"]:
                element = app.Element.getBySymbol(symbol) if symbol else None
                atoms.append(top.addAtom(name, element, res))
    for i, j in data["bonds"]:
        top.addBond(atoms[i], atoms[j])
    if "box_vectors" in data:
        top.setPeriodicBoxVectors(np.asarray(data["box_vectors"]) * unit.nanometer)
    return top


def topology_to_json(topology: app.Topology) -> str:
    return json.dumps(topology_to_dict(topology), separators=(",", ":"))


def topology_from_json(text: str) -> app.Topology:
    return topology_from_dict(json.loads(text))


def topology_fingerprint(topology: app.Topology) -> str:
    """Hash of residue names, atom names, elements and bonds (not coordinates, ids or box).

    Two topologies with the same fingerprint describe the same molecule(s) in the same atom order.
    """
    h = hashlib.sha256()
    for res in topology.residues():
        h.update(res.name.encode())
        for atom in res.atoms():
            sym = atom.element.symbol if atom.element is not None else "?"
            h.update(f"|{atom.name}:{sym}".encode())
        h.update(b";")
    for a, b in sorted(tuple(sorted((b[0].index, b[1].index))) for b in topology.bonds()):
        h.update(f"{a}-{b},".encode())
    return h.hexdigest()[:16]
