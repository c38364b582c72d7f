"""Model lifecycle: promotion into the model store behind a gate, rollback, and the retraining pipeline."""
