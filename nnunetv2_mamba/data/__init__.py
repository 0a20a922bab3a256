"""Dataset builders and converters (synthetic demo data, video <-> nnU-Net)."""
