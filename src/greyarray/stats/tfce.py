"""Threshold-free cluster enhancement (Smith & Nichols 2009) on any element space, exactly.

TFCE(v) = integral over h from 0 to X(v) of e(h, v)^E h^H dh, where e(h, v) is the extent of the
cluster of {X >= h} holding v. The extent changes only at data values, so the integral is a sum
of closed-form pieces: one sweep over the values in decreasing order, merging clusters with a
union-find whose roots carry the integral accrued so far (each node stores its offset from its
parent, so a vertex joining a cluster does not inherit what the cluster accrued above it). One
map of 91k greyordinates costs a few milliseconds; PALM instead sums 100 thresholds
(dh = max/100), which differs from the integral by at most about one step (see DEVELOPERS.md).

Neighbours come from the element space (``spaces``); extents and exponents follow PALM's
defaults: on surfaces (the fsLR 32k cortex) vertices are joined by the edges of the triangles,
extent = area on the midthickness surface (E = 1, PALM's -tfce2D); voxels (NIfTI maps, CIFTI's
subcortical structures) are joined to their 6 face neighbours (PALM's volume default; 18 or 26
with ``--tfce-connectivity``), extent = voxel count (E = 0.5); H = 2. CIFTI structures never
connect to one another; fixels have no neighbourhood without tractography (refused).
"""

from __future__ import annotations

from dataclasses import dataclass

import h5py
import numpy as np

from greyarray.io.spaces import Neighbours, read_neighbours
from greyarray.io.spaces.base import csr
from greyarray.stats.compiled import compiled

HEIGHT = 2.0  # H, for surfaces and volumes
SURFACE_EXTENT = 1.0  # E on surfaces (PALM -tfce2D)
VOLUME_EXTENT = 0.5  # E in volumes (PALM's default)


@dataclass(frozen=True)
class Graph:
    """Neighbours of each element (CSR), its extent weight (area or 1) and its E exponent."""

    indptr: np.ndarray  # (n + 1,) int64
    indices: np.ndarray  # (n_edges * 2,) int32: half the memory traffic of int64
    weight: np.ndarray  # (n,) float64
    exponent: np.ndarray  # (n,) float64

    @property
    def size(self) -> int:
        return self.weight.size


def from_edges(n: int, edges: np.ndarray, weight: np.ndarray, exponent: np.ndarray) -> Graph:
    """A graph on ``n`` elements from undirected ``edges`` (pairs of element indices)."""
    indptr, indices = csr(n, edges)
    return Graph(
        indptr,
        indices,
        np.asarray(weight, dtype=np.float64),
        np.asarray(exponent, dtype=np.float64),
    )


def tfce(values: np.ndarray, graph: Graph, height: float = HEIGHT) -> np.ndarray:
    """TFCE of a map (elements with NaN or values <= 0 score 0 and join no cluster)."""
    values = np.ascontiguousarray(values, dtype=np.float64)
    if values.shape != (graph.size,):
        raise ValueError(f"a map of {values.shape} values on a graph of {graph.size} elements")
    order = np.argsort(-values)  # decreasing, NaN last (numpy's sort is faster than numba's)
    return _tfce(values, order, graph.indptr, graph.indices, graph.weight, graph.exponent, height)


@compiled
def _find(node, parent, acc):
    """Root of ``node``; halves the path, folding the offsets of skipped nodes into acc."""
    while parent[node] != node:
        up = parent[node]
        if parent[up] != up:  # skip ``up``: node's offset absorbs up's
            acc[node] += acc[up]
            parent[node] = parent[up]
        node = parent[node]
    return node


@compiled
def _tfce(values, order, indptr, indices, weight, exponent, height):
    n = values.size
    power = height + 1.0
    parent = np.full(n, -1, dtype=np.int32)  # -1: not above the current threshold yet
    extent = np.zeros(n)  # per root: area or voxel count of its cluster
    size = np.zeros(n, dtype=np.int32)  # per root: number of elements (union by size)
    level = np.zeros(n)  # per root: the threshold down to which acc is complete
    acc = np.zeros(n)  # per root: integral so far; per other node: offset from its parent
    added = 0
    for v in order:
        h = values[v]
        if not h > 0:
            break
        parent[v] = v
        extent[v] = weight[v]
        size[v] = 1
        level[v] = h
        added += 1
        a = v  # the root of v's cluster
        for j in range(indptr[v], indptr[v + 1]):
            if parent[indices[j]] < 0:
                continue
            b = _find(indices[j], parent, acc)
            if a == b:
                continue
            acc[a] += extent[a] ** exponent[a] * (level[a] ** power - h**power) / power
            acc[b] += extent[b] ** exponent[b] * (level[b] ** power - h**power) / power
            level[a] = level[b] = h  # both clusters' integrals closed down to h
            if size[a] < size[b]:
                a, b = b, a
            parent[b] = a
            acc[b] -= acc[a]
            extent[a] += extent[b]
            size[a] += size[b]
    out = np.zeros(n)
    for i in range(added):
        v = order[i]
        if parent[v] == v:  # close every cluster's integral down to 0
            acc[v] += extent[v] ** exponent[v] * level[v] ** power / power
    for i in range(added):  # a vertex's score: the offsets on its path, the root's total
        node = order[i]
        total = acc[node]
        while parent[node] != node:
            node = parent[node]
            total += acc[node]
        out[order[i]] = total
    return out


def graph(neighbours: Neighbours) -> Graph:
    """The TFCE graph of an element space's neighbourhood: E = 1 on surfaces, 0.5 in volumes."""
    exponent = np.where(neighbours.surface, SURFACE_EXTENT, VOLUME_EXTENT)
    return Graph(neighbours.indptr, neighbours.indices, neighbours.weight, exponent)


def element_graph(h5: h5py.File, connectivity: int = 6) -> Graph:
    """The TFCE graph of the element space stored in ``h5`` (``greyarray/geometry``); voxels
    (subcortical greyordinates, NIfTI voxels) touch by a face (6), an edge (18) or a corner
    (26)."""
    return graph(read_neighbours(h5, connectivity))
