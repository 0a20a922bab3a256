"""Imported by the ``nnunetv2_mamba.pth`` start-up hook; importing the package registers the trainers."""
