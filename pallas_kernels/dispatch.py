"""What every kernel package's `resolve` checks alike."""


def require_gpu(impl: str, backend: str) -> None:
  """Raises ValueError if `impl` is a compiled Pallas kernel ("pallas") and `backend` (as
  `jax.default_backend()` names it) is not a GPU; the interpreted kernels run anywhere."""
  if impl == "pallas" and backend != "gpu":
    raise ValueError(f"impl='pallas' needs a GPU (backend is {backend!r}); use "
                     "'pallas_interpret' to run the kernels in the interpreter, or 'xla'")
