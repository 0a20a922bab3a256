"""Selective scan with interchangeable backends."""
from nnunetv2_mamba.ssm.scan import (BACKEND_ENV_VAR, BackendError, backend_names, describe_backends,
                                     get_backend, register_backend, select_backend, select_backend_for,
                                     selective_scan)

__all__ = ["BACKEND_ENV_VAR", "BackendError", "backend_names", "describe_backends", "get_backend",
           "register_backend", "select_backend", "select_backend_for", "selective_scan"]
