"""Placeholder until the cluster stage lands."""

from distilray._pending import not_implemented


def cluster_main(*args: object) -> int:
    raise not_implemented("cluster", "cluster")
