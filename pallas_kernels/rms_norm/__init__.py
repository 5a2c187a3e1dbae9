"""Residual add + RMSNorm (the model's pre-norm residual stream): reference, kernels, dispatch.

Shapes in every module use the dimension letters of `based_jax/__init__.py`.
"""

from pallas_kernels.rms_norm.api import IMPLEMENTATIONS, add_rms_norm, resolve, rms_norm
