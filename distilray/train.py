"""Ray Train stage (in progress)."""

from distilray.config import Config
from distilray.errors import DistilrayError


def run_training(cfg: Config, dry_run: bool = False) -> None:
    raise DistilrayError("'distilray train' is not implemented yet (planned in: Ray Train: "
                         "data-parallel DistilBERT fine-tuning that survives failures)")
