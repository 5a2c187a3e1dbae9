"""Training infrastructure shared by every experiment: optimizer, sharding, steps, checkpoints."""
