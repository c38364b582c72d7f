"""Placeholder until the tune stage lands."""

from distilray._pending import not_implemented


def report_main(*args: object) -> int:
    raise not_implemented("tune", "report")
