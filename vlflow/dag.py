"""The stage graph, on the standard library's `graphlib` (ordering, cycle detection).

networkx did this before; importing it cost about a third of a no-op `vlflow run` (it pulls in its whole algorithm
package), for a graph of a few dozen nodes. The names follow networkx's (`DiGraph`, `ancestors`, `descendants`,
`lexicographical_topological_sort`, `find_cycle`), and tests/engine/test_dag.py checks the answers against networkx.
"""
from __future__ import annotations

import heapq
from collections.abc import Hashable, Iterable, Iterator
from graphlib import CycleError, TopologicalSorter

__all__ = ["CycleError", "DiGraph", "NoCycle", "ancestors", "descendants", "find_cycle",
           "lexicographical_topological_sort"]


class NoCycle(Exception):
    """`find_cycle` found none (networkx's NetworkXNoCycle)."""


class DiGraph:
    """Nodes and edges in insertion order: successors and predecessors of each node."""

    def __init__(self) -> None:
        self._succ: dict[Hashable, dict[Hashable, None]] = {}
        self._pred: dict[Hashable, dict[Hashable, None]] = {}

    def add_node(self, node: Hashable) -> None:
        self._succ.setdefault(node, {})
        self._pred.setdefault(node, {})

    def add_nodes_from(self, nodes: Iterable[Hashable]) -> None:
        for node in nodes:
            self.add_node(node)

    def add_edge(self, a: Hashable, b: Hashable) -> None:
        self.add_node(a)
        self.add_node(b)
        self._succ[a][b] = None
        self._pred[b][a] = None

    def add_edges_from(self, edges: Iterable[tuple[Hashable, Hashable]]) -> None:
        for a, b in edges:
            self.add_edge(a, b)

    @property
    def nodes(self) -> list:
        return list(self._succ)

    @property
    def edges(self) -> list[tuple]:
        return [(a, b) for a, targets in self._succ.items() for b in targets]

    def __contains__(self, node: object) -> bool:
        return node in self._succ

    def __iter__(self) -> Iterator:
        return iter(self._succ)

    def __len__(self) -> int:
        return len(self._succ)

    def successors(self, node: Hashable) -> Iterator:
        return iter(self._succ[node])

    def predecessors(self, node: Hashable) -> Iterator:
        return iter(self._pred[node])

    def in_degree(self, node: Hashable) -> int:
        return len(self._pred[node])

    def sorter(self) -> TopologicalSorter:
        return TopologicalSorter({node: list(preds) for node, preds in self._pred.items()})


def _reachable(neighbours: dict, start: Hashable) -> set:
    seen: set = set()
    stack = list(neighbours[start])
    while stack:
        node = stack.pop()
        if node not in seen:
            seen.add(node)
            stack.extend(neighbours[node])
    seen.discard(start)
    return seen


def ancestors(graph: DiGraph, node: Hashable) -> set:
    """Every node with a path to `node` (not `node` itself)."""
    return _reachable(graph._pred, node)


def descendants(graph: DiGraph, node: Hashable) -> set:
    """Every node reachable from `node` (not `node` itself)."""
    return _reachable(graph._succ, node)


def lexicographical_topological_sort(graph: DiGraph) -> Iterator:
    """graphlib's order, taking the smallest ready node first: one order for a graph, whatever its insertion order
    (networkx's lexicographical_topological_sort). Raises graphlib.CycleError on a cycle."""
    sorter = graph.sorter()
    sorter.prepare()
    ready = list(sorter.get_ready())
    heapq.heapify(ready)
    while ready:
        node = heapq.heappop(ready)
        yield node
        sorter.done(node)
        for successor in sorter.get_ready():
            heapq.heappush(ready, successor)


def find_cycle(graph: DiGraph) -> list[tuple]:
    """The edges of one cycle (as graphlib reports it), else NoCycle."""
    try:
        graph.sorter().prepare()
    except CycleError as exc:
        nodes = exc.args[1]  # along the edges, first node repeated last: [a, b, ..., a]
        return list(zip(nodes, nodes[1:]))
    raise NoCycle("no cycle")
