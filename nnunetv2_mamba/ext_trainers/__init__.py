"""Folder listed in $nnUNet_extTrainer. nnU-Net imports the module inside it; see registration.py."""
