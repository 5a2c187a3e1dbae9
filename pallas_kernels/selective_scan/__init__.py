"""Mamba's selective scan: the XLA reference and the Pallas kernels behind one entry point.

Shapes in every module use the dimension letters of `based_jax/__init__.py`.
"""

from pallas_kernels.selective_scan.api import IMPLEMENTATIONS, resolve, selective_scan
