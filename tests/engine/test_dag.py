"""vlflow.dag against networkx (the library it replaces in the engine) on random graphs."""
from __future__ import annotations

import random

import networkx as nx
import pytest

from vlflow import dag


def random_graphs(count: int, cyclic: bool):
    rng = random.Random(7 if cyclic else 3)
    for _ in range(count):
        names = [f"s{i}" for i in range(rng.randint(1, 14))]
        rng.shuffle(names)
        edges = []
        for i, a in enumerate(names):
            for j, b in enumerate(names):
                if (i < j or cyclic) and a != b and rng.random() < 0.2:
                    edges.append((a, b))
        ours, theirs = dag.DiGraph(), nx.DiGraph()
        for graph in (ours, theirs):
            graph.add_nodes_from(names)
            graph.add_edges_from(edges)
        yield ours, theirs


def test_same_answers_as_networkx_on_random_dags():
    for ours, theirs in random_graphs(200, cyclic=False):
        assert ours.nodes == list(theirs.nodes) and ours.edges == list(theirs.edges)
        assert list(dag.lexicographical_topological_sort(ours)) == list(nx.lexicographical_topological_sort(theirs))
        for node in ours.nodes:
            assert dag.ancestors(ours, node) == nx.ancestors(theirs, node)
            assert dag.descendants(ours, node) == nx.descendants(theirs, node)
            assert ours.in_degree(node) == theirs.in_degree(node)
            assert list(ours.successors(node)) == list(theirs.successors(node))
        with pytest.raises(dag.NoCycle):
            dag.find_cycle(ours)


def test_cycles_are_found_when_networkx_finds_one():
    found = 0
    for ours, theirs in random_graphs(200, cyclic=True):
        try:
            expected = nx.find_cycle(theirs)
        except nx.NetworkXNoCycle:
            with pytest.raises(dag.NoCycle):
                dag.find_cycle(ours)
            continue
        found += 1
        cycle = dag.find_cycle(ours)  # graphlib's cycle: a real one, maybe another than networkx meets first
        assert expected and all(b in set(ours.successors(a)) for a, b in cycle) and cycle[0][0] == cycle[-1][1]
        assert all(cycle[i][1] == cycle[i + 1][0] for i in range(len(cycle) - 1))
        with pytest.raises(dag.CycleError):
            list(dag.lexicographical_topological_sort(ours))
    assert found > 50
