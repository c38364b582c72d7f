"""Placeholder until the distill stage lands."""

from distilray._pending import not_implemented


def distill_main(*args: object) -> int:
    raise not_implemented("distill", "distill")
