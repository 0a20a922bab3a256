"""Selective-scan backends. Each module defines one backend object; ``nnunetv2_mamba.ssm.scan`` registers them."""
