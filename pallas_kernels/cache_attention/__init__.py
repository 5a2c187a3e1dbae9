"""One decoded query per row attending over a key / value cache (sliding-window or full softmax
attention): reference, kernel, dispatch.

Shapes in every module use the dimension letters of `based_jax/__init__.py`.
"""

from pallas_kernels.cache_attention.api import IMPLEMENTATIONS, decode_attention, resolve
