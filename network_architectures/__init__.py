"""Plain ``torch.nn`` networks (no nnU-Net import): usable outside nnU-Net with explicit arguments."""
