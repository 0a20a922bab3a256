"""nnU-Net trainer subclasses (thin: recipe attributes plus ``build_network``)."""
