"""Batch inference and evaluation on Ray Data (`distilray predict --input`, `distilray evaluate`)."""
