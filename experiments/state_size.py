"""Prints a model's parameter count and recurrent state size per layer.

  python -m experiments.state_size --preset=based_360m --seq_len=2048
"""

from absl import app, flags

from based_jax.cache import cache_bytes
from based_jax.config import get_config, preset_names
from based_jax.model import count_params
from based_jax.state_size import state_size_bytes

_PRESET = flags.DEFINE_enum("preset", "based_360m", list(preset_names()), "Model preset.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 2048, "Sequence length L the state is counted at.")
_SYMMETRIC = flags.DEFINE_bool(
    "symmetric", True, "Count 1 + F + F(F+1)/2 Taylor features (the paper's plots and our "
    "stored state); --nosymmetric counts the full 1 + F + F^2.")


def summary(preset: str, seq_len: int, symmetric: bool) -> str:
  config = get_config(preset)
  size = state_size_bytes(config, seq_len, symmetric_features=symmetric)
  lines = [f"{preset}: {count_params(config) / 1e6:.1f}M parameters, d_model {config.d_model}, "
           f"{config.n_layers} layers",
           f"recurrent state at L={seq_len} (float32, as the paper counts it):"]
  lines += [f"  layer {i:3d} {kind:17s} {b:>14,d} bytes" for i, (kind, b) in
            enumerate(size.per_layer)]
  lines.append(f"  total {size.total:>33,d} bytes ({size.total / 2**20:.2f} MiB)")
  lines.append(f"decoding cache actually held, batch 1, max_len {seq_len}: "
               f"{cache_bytes(config, 1, seq_len):,d} bytes")
  return "\n".join(lines)


def main(argv):
  del argv
  print(summary(_PRESET.value, _SEQ_LEN.value, _SYMMETRIC.value))


if __name__ == "__main__":
  app.run(main)
