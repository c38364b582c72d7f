"""Placeholder until the serve stage lands."""

from distilray._pending import not_implemented


def serve_main(*args: object) -> int:
    raise not_implemented("serve", "serve")
