"""Writes PyTorch's zip checkpoint format (what `torch.save` writes) without PyTorch.

A test helper: it lets the `.bin` reader (based_jax.pretrained.torch_pickle) be tested where
PyTorch is not installed. The archive is `<folder>/data.pkl` (protocol 2, tensors as
`torch._utils._rebuild_tensor_v2(storage, offset, size, stride, False, OrderedDict())` with
persistent ids `("storage", torch.<Type>Storage, key, "cpu", numel)`), `<folder>/data/<key>`
(raw little-endian bytes), `<folder>/byteorder` and `<folder>/version`, as PyTorch writes it.
The pickle is made by the standard pickler from stand-ins of this module whose GLOBAL
opcodes are then renamed to PyTorch's names (protocol 2 spells a global as text lines).
"""

import collections
import io
import pickle
import zipfile
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np

_STORAGES = {np.dtype(np.float32): "FloatStorage", np.dtype(np.float64): "DoubleStorage",
             np.dtype(np.float16): "HalfStorage", np.dtype(jnp.bfloat16): "BFloat16Storage",
             np.dtype(np.int64): "LongStorage", np.dtype(np.int32): "IntStorage",
             np.dtype(np.uint8): "ByteStorage", np.dtype(np.bool_): "BoolStorage"}


def _rebuild_tensor_v2(*args):  # a stand-in: only its name reaches the pickle
  raise AssertionError("never called")


class Strided(NamedTuple):
  """A tensor that views `storage` (a 1-D array; entries sharing it share one storage)."""
  storage: np.ndarray
  offset: int
  shape: tuple
  stride: tuple


class _StorageRef(NamedTuple):
  key: str
  dtype: np.dtype
  numel: int


class _Tensor:
  def __init__(self, ref: _StorageRef, offset: int, shape: tuple, stride: tuple):
    self.args = (ref, offset, tuple(shape), tuple(stride), False, collections.OrderedDict())

  def __reduce__(self):
    return (_rebuild_tensor_v2, self.args)


_STAND_INS = {name: type(name, (), {"__module__": __name__}) for name in _STORAGES.values()}
globals().update(_STAND_INS)
_RENAMES = [(f"c{__name__}\n_rebuild_tensor_v2\n", "ctorch._utils\n_rebuild_tensor_v2\n")] + [
    (f"c{__name__}\n{name}\n", f"ctorch\n{name}\n") for name in _STAND_INS]


class _Pickler(pickle.Pickler):
  def persistent_id(self, obj):
    if isinstance(obj, _StorageRef):
      return ("storage", _STAND_INS[_STORAGES[obj.dtype]], obj.key, "cpu", obj.numel)
    return None


def write_raw(path: str, data_pkl: bytes, storages: dict[str, bytes] = None,
              folder: str = "archive") -> None:
  """An archive with this `data.pkl` and these storage files."""
  with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
    archive.writestr(f"{folder}/data.pkl", data_pkl)
    archive.writestr(f"{folder}/byteorder", "little")
    for key, raw in (storages or {}).items():
      archive.writestr(f"{folder}/data/{key}", raw)
    archive.writestr(f"{folder}/version", "3\n")


def save(path: str, tensors: dict, folder: str = "archive") -> None:
  """torch.save of an OrderedDict name -> tensor; values are arrays (each its own storage) or
  `Strided` views."""
  storages: dict[int, tuple[_StorageRef, bytes]] = {}

  def storage_of(array: np.ndarray) -> _StorageRef:
    if id(array) not in storages:
      flat = np.ascontiguousarray(array).reshape(-1)
      ref = _StorageRef(str(len(storages)), flat.dtype, flat.size)
      storages[id(array)] = (ref, flat.astype(flat.dtype.newbyteorder("<")).tobytes())
    return storages[id(array)][0]

  state = collections.OrderedDict()
  for name, value in tensors.items():
    if isinstance(value, Strided):
      state[name] = _Tensor(storage_of(value.storage), value.offset, value.shape, value.stride)
    else:
      value = np.asarray(value)
      strides = tuple(int(np.prod(value.shape[i + 1:])) for i in range(value.ndim))
      state[name] = _Tensor(storage_of(value), 0, value.shape, strides)
  buffer = io.BytesIO()
  _Pickler(buffer, protocol=2).dump(state)
  data = buffer.getvalue()
  for old, new in _RENAMES:
    data = data.replace(old.encode(), new.encode())
  write_raw(path, data, {ref.key: raw for ref, raw in storages.values()}, folder)
