"""Reads PyTorch `.bin` / `.pt` checkpoints (the zip format of `torch.save`) without PyTorch,
loading tensors and nothing else.

The format (PyTorch >= 1.6): a zip archive with one top-level folder holding `data.pkl` (a
pickle of the saved object), `data/<key>` (the raw bytes of each storage), `byteorder`
("little" or "big") and version files. In the pickle a tensor is a call of
`torch._utils._rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks)` whose
storage is a persistent id `("storage", torch.<Type>Storage, key, location, numel)`.

A pickle can call any importable function while it loads (`os.system`, ...), so the
unpickler here resolves only the globals a state dict needs: `collections.OrderedDict`,
and to sealed stand-ins of this module (whose attributes a pickle cannot set)
`torch._utils._rebuild_tensor_v2`, `torch._utils._rebuild_parameter` (and `_with_state`)
and the typed storage classes `torch.<Type>Storage`. Any other global is refused with a
ValueError naming it, before anything of it runs; so is a persistent id that is not a
storage. Tensors become numpy arrays (bfloat16 as jax's ml_dtypes type), bounds-checked
against their storage.
"""

import collections
import io
import pickle
import sys
import zipfile
from typing import Any

import jax.numpy as jnp
import numpy as np

_STORAGE_DTYPES = {
    "DoubleStorage": np.float64, "FloatStorage": np.float32, "HalfStorage": np.float16,
    "BFloat16Storage": jnp.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8,
    "BoolStorage": np.bool_, "UntypedStorage": np.uint8,
}


class _Sealed:
  """Objects the pickle gets hold of refuse BUILD (the opcode that sets attributes)."""
  __slots__ = ()

  def __setstate__(self, state):
    raise ValueError(f"refusing to set state {state!r} on {self!r}: only tensors are loaded")


class _StorageType(_Sealed):
  """What `torch.<Type>Storage` resolves to: the element dtype."""
  __slots__ = ("name", "dtype")

  def __init__(self, name: str):
    self.name, self.dtype = name, np.dtype(_STORAGE_DTYPES[name])

  def __repr__(self):
    return f"torch.{self.name}"


class _Function(_Sealed):
  """An allowed global the pickle may call (a sealed wrapper of one function here)."""
  __slots__ = ("name", "function")

  def __init__(self, name: str, function):
    self.name, self.function = name, function

  def __call__(self, *args):
    return self.function(*args)

  def __repr__(self):
    return self.name


class _Storage:
  """One storage's elements, a flat read-only array."""

  def __init__(self, data: np.ndarray, key: str):
    self.data, self.key = data, key


def _check_hooks(hooks, what: str) -> None:
  if hooks is not None and (not isinstance(hooks, dict) or hooks):
    raise ValueError(f"refusing a tensor with {what} ({type(hooks).__name__}): only plain "
                     "tensors are loaded")


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad, backward_hooks,
                       metadata=None):
  """A numpy view of `storage` (what torch builds as a tensor), bounds-checked."""
  del requires_grad
  _check_hooks(backward_hooks, "backward hooks")
  _check_hooks(metadata, "tensor metadata")
  if not isinstance(storage, _Storage):
    raise ValueError(f"a tensor's storage must be a storage record, got {type(storage).__name__}")
  ints = lambda xs: isinstance(xs, tuple) and all(
      isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in xs)
  if not (ints((storage_offset,)) and ints(size) and ints(stride) and len(size) == len(stride)):
    raise ValueError(f"malformed tensor in storage {storage.key}: offset {storage_offset!r}, "
                     f"size {size!r}, stride {stride!r}")
  flat = storage.data
  if 0 in size:
    return np.zeros(size, flat.dtype)
  last = storage_offset + sum((n - 1) * s for n, s in zip(size, stride))
  if last >= flat.size:
    raise ValueError(f"tensor of size {size} stride {stride} at offset {storage_offset} reads "
                     f"past the end of storage {storage.key} ({flat.size} elements)")
  view = np.lib.stride_tricks.as_strided(
      flat[storage_offset:], shape=size, strides=tuple(s * flat.itemsize for s in stride),
      writeable=False)
  return np.ascontiguousarray(view)


def _rebuild_parameter(data, requires_grad, backward_hooks):
  del requires_grad
  _check_hooks(backward_hooks, "backward hooks")
  return data


def _rebuild_parameter_with_state(data, requires_grad, backward_hooks, state):
  _check_hooks(state, "parameter state")
  return _rebuild_parameter(data, requires_grad, backward_hooks)


_FUNCTIONS = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter_with_state,
}


class _Unpickler(pickle.Unpickler):
  """Resolves only `_ALLOWED` globals and storage classes; storages come from the archive."""

  def __init__(self, data: bytes, read_storage):
    super().__init__(io.BytesIO(data))
    self._read_storage = read_storage

  def find_class(self, module: str, name: str):
    if (module, name) == ("collections", "OrderedDict"):
      return collections.OrderedDict  # a state dict; a built-in type cannot be altered
    if (module, name) in _FUNCTIONS:
      return _Function(f"{module}.{name}", _FUNCTIONS[(module, name)])
    if module == "torch" and name in _STORAGE_DTYPES:
      return _StorageType(name)
    raise ValueError(f"refusing to load {module}.{name}: this checkpoint's pickle calls or "
                     "builds an object that is not a tensor (only tensors and dicts of them "
                     "are loaded, never code)")

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
            and isinstance(pid[1], _StorageType) and isinstance(pid[2], str)
            and isinstance(pid[4], int)):
      raise ValueError(f"refusing persistent id {pid!r}: only tensor storages are loaded")
    _, kind, key, _, numel = pid
    return self._read_storage(key, kind.dtype, numel)


def load(path: str) -> Any:
  """The object `torch.save` wrote to `path` (a dict of tensors: a state dict), with tensors as
  numpy arrays.

  Raises:
    ValueError if the file is not a zip-format PyTorch checkpoint, or its pickle refers to
    anything but tensors (naming the global it refused).
  """
  if not zipfile.is_zipfile(path):
    raise ValueError(f"{path} is not a zip-format PyTorch checkpoint (torch.save writes one "
                     "since PyTorch 1.6; re-save older files with a recent PyTorch)")
  with zipfile.ZipFile(path) as archive:
    names = archive.namelist()
    pickles = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(pickles) != 1:
      raise ValueError(f"{path} has no single <folder>/data.pkl (found {pickles}): not a "
                       "torch.save archive")
    prefix = pickles[0][:-len("data.pkl")]
    order = "little"
    if prefix + "byteorder" in names:
      order = archive.read(prefix + "byteorder").decode().strip()
      if order not in ("little", "big"):
        raise ValueError(f"{path}: unknown byteorder {order!r}")
    cache: dict[str, _Storage] = {}

    def read_storage(key: str, dtype: np.dtype, numel: int) -> _Storage:
      if key not in cache:
        member = f"{prefix}data/{key}"
        if member not in names:
          raise ValueError(f"{path} has no storage {member}")
        raw = archive.read(member)
        if numel < 0 or len(raw) < numel * dtype.itemsize:
          raise ValueError(f"{path}: storage {key} holds {len(raw)} bytes, fewer than its "
                           f"{numel} elements of {dtype}")
        data = np.frombuffer(raw, dtype, count=numel)
        if order != sys.byteorder and dtype.itemsize > 1:
          data = data.byteswap()
        cache[key] = _Storage(data, key)
      return cache[key]

    return _Unpickler(archive.read(pickles[0]), read_storage).load()


def load_state_dict(path: str) -> dict[str, np.ndarray]:
  """`load(path)`, which must be a mapping of names to tensors (a `state_dict()`)."""
  obj = load(path)
  if not isinstance(obj, dict):
    raise ValueError(f"{path} holds a {type(obj).__name__}, not a state dict")
  bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, np.ndarray)]
  if bad:
    raise ValueError(f"{path} is not a flat state dict: entries {bad[:8]} are not tensors")
  return dict(obj)
