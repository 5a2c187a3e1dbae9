"""Data-parallel batches and FSDP-style parameter sharding over one mesh axis.

All devices (of every process, in a multi-host run) form a 1-D mesh with axis "data".
Batches are split along their leading dimension; each process supplies the rows of its own
devices (`global_batch`). Each parameter (and each optimizer-state leaf) is split along its largest dimension
that the device count divides, and replicated if none does; XLA inserts the all-gathers and
reduce-scatters. One device is simply a mesh of size 1.
"""

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXIS = "data"


def make_mesh(devices=None) -> Mesh:
  """All devices of all processes (one process: its local devices) on the "data" axis."""
  devices = jax.devices() if devices is None else devices
  return Mesh(np.asarray(devices), (AXIS,))


def fsdp_spec(shape: tuple[int, ...], n: int) -> P:
  """Shard the largest dimension divisible by n; replicate otherwise."""
  if n > 1:
    for dim in sorted(range(len(shape)), key=lambda i: -shape[i]):
      if shape[dim] % n == 0:
        return P(*[AXIS if i == dim else None for i in range(len(shape))])
  return P()


def tree_shardings(mesh: Mesh, tree):
  """NamedShardings for every array leaf of a pytree of arrays or ShapeDtypeStructs."""
  n = mesh.devices.size
  return jax.tree.map(lambda x: NamedSharding(mesh, fsdp_spec(tuple(x.shape), n)), tree)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(AXIS))


def global_batch(batch, mesh: Mesh):
  """The global batch from each process's rows (numpy [B / processes, ...] per leaf): on one
  process simply the batch, placed on the devices."""
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(batch_sharding(mesh), x), batch)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())
