"""Memory-aware planning: estimate a training step's GPU memory per network family, plan patch and batch to fit."""
