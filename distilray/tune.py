"""Placeholder until the tune stage lands."""

from distilray._pending import not_implemented


def tune_main(*args: object) -> int:
    raise not_implemented("tune", "tune")
