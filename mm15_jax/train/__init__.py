"""Training: train state, stage builder, jitted step, optimiser, checkpoints, logs, the stage runner."""
