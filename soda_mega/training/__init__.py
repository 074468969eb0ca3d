"""Training: schedules, optimisation, checkpoints, logging."""
