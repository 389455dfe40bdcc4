"""Training pipeline, evaluation, reports, walk-forward, tuning and the promotion gate."""
