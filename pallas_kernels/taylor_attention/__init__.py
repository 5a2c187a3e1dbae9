"""Causal Taylor linear attention (BASED): feature map, reference, XLA fallback, kernels.

Shapes in every module use the dimension letters of `based_jax/__init__.py`.
"""

from pallas_kernels.taylor_attention.api import IMPLEMENTATIONS, causal_taylor_attention
from pallas_kernels.taylor_attention.feature_map import feature_width, taylor_feature_map
from pallas_kernels.taylor_attention.state import TaylorState, zero_state
