"""The stage graph: the few directed-graph operations the engine needs, on the standard library.

networkx did this before; importing it cost about a third of a no-op `vlflow run` (it pulls in its whole algorithm
package), for a graph of a few dozen nodes. Names and results follow networkx's (`DiGraph`, `ancestors`,
`descendants`, `lexicographical_topological_sort`, `find_cycle`), so the callers read the same.
"""
from __future__ import annotations

import heapq
from collections.abc import Hashable, Iterable, Iterator


class NoCycle(Exception):
    """`find_cycle` found none (networkx's NetworkXNoCycle)."""


class CycleError(ValueError):
    """A topological order was asked of a graph with a cycle."""


class DiGraph:
    """Nodes and edges in insertion order (iteration is deterministic, like networkx's)."""

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

    def out_degree(self, node: Hashable) -> int:
        return len(self._succ[node])


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
    """Kahn's algorithm taking the smallest ready node first: one order for a graph, whatever its insertion order."""
    remaining = {node: len(preds) for node, preds in graph._pred.items()}
    ready = [node for node, count in remaining.items() if count == 0]
    heapq.heapify(ready)
    emitted = 0
    while ready:
        node = heapq.heappop(ready)
        emitted += 1
        yield node
        for succ in graph._succ[node]:
            remaining[succ] -= 1
            if remaining[succ] == 0:
                heapq.heappush(ready, succ)
    if emitted != len(graph):
        raise CycleError("the graph has a cycle")


_END = object()


def find_cycle(graph: DiGraph) -> list[tuple]:
    """The edges of a cycle (the first a depth-first search over the nodes in order meets), else NoCycle."""
    done: set = set()
    for root in graph._succ:
        if root in done:
            continue
        path = [root]
        on_path = {root: 0}
        iterators = [iter(graph._succ[root])]
        while iterators:
            nxt = next(iterators[-1], _END)
            if nxt is _END:
                node = path.pop()
                del on_path[node]
                done.add(node)
                iterators.pop()
                continue
            if nxt in on_path:
                cycle = path[on_path[nxt]:]
                return list(zip(cycle, cycle[1:] + [nxt]))
            if nxt in done:
                continue
            on_path[nxt] = len(path)
            path.append(nxt)
            iterators.append(iter(graph._succ[nxt]))
    raise NoCycle("no cycle")
