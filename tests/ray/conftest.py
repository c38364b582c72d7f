"""Ray fixtures live in tests/conftest.py so serve, tune and distill tests share one cluster."""
