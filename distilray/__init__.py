"""distilray: fine-tune, tune, serve and distil DistilBERT on Ray."""

__version__ = "0.1.0"
