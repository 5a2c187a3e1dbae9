"""Does a bfloat16 Taylor state lose recall? MQAR accuracy when decoding with a rounded state.

  python -m experiments.state_precision --out=experiments/results/state_precision_mqar_cpu.json

Trains (or resumes) the MQAR CPU run in --workdir (d' = 16 by default), then reads every test
slice token by token through the decoding path (`LanguageModel` with a cache, one `lax.scan`
per slice) three ways: the float32 state; `la_state_dtype="bfloat16"`, the library's option
that stores the numerator state kv in bf16 (rounded once per token, the normaliser float32);
and, simulated here because the library refuses it, that plus the normaliser k rounded through
bf16 after every token. Reported per slice: per-query accuracy, agreement of the predicted
tokens with the float32 run, and the relative L2 error of the logits at the query positions.
The full-sequence (training) forward is reported too: it must match float32 decoding.
"""

import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging

from based_jax.cache import as_carry, init_cache
from based_jax.config import ModelConfig, get_config
from based_jax.model import LanguageModel
from based_jax.training.run_config import get_run_config, parse_assignments
from based_jax.data import mqar
from experiments.benchmarking import run_metadata
from based_jax.training.trainer import train
from pallas_kernels.taylor_attention import TaylorState

_RUN = flags.DEFINE_string("run", "mqar_small", "Run preset to train (or resume) and test.")
_MODEL_SET = flags.DEFINE_multi_string(
    "model_set", ["la_feature_dim=16"], "Model field overrides, field=value (default: the "
    "released feature dim d' = 16, whose state layout the GPU kernels use).")
_WORKDIR = flags.DEFINE_string("workdir", "runs/state_precision", "Checkpoints of the run.")
_SLICES = flags.DEFINE_list(
    "slices", ["64x4", "128x8", "256x16", "1024x16", "2048x16"],
    "Test slices, seq_len x kv_pairs: the training lengths, then long ones, where a rounded "
    "state has had the most updates (2048 = a 1024-token prompt plus 1024 generated).")
_EXAMPLES = flags.DEFINE_integer("examples", 250, "Examples per test slice.")
_OUT = flags.DEFINE_string("out", "experiments/results/state_precision_mqar_cpu.json",
                           "JSON output path.")

VARIANTS = {  # name -> (la_state_dtype, state fields also rounded through bf16 per token)
    "float32": ("float32", ()),
    "bf16_kv": ("bfloat16", ()),
    "bf16_kv_and_k_simulated": ("bfloat16", ("k",)),
}


def round_state(cache, fields):
  """The cache with the named TaylorState fields rounded through bfloat16."""
  def one(layer):
    if not isinstance(layer, TaylorState):
      return layer
    return layer._replace(**{f: getattr(layer, f).astype(jnp.bfloat16).astype(jnp.float32)
                             for f in fields})
  return cache._replace(layers=tuple(one(layer) for layer in cache.layers))


def query_positions(labels: np.ndarray) -> np.ndarray:
  """[N, K] positions of the K queries of each example (every MQAR example has K)."""
  _, cols = np.nonzero(labels != mqar.IGNORE)
  return cols.reshape(labels.shape[0], -1)


def decode_logits(model, params, tokens, positions, fields):
  """Logits [N, K, V] at `positions` [N, K] from reading tokens [N, T] one at a time through
  the cache (only the K query logits per row are kept: [N, T, V] would not fit)."""
  n, t = tokens.shape
  rows = jnp.arange(n)

  def step(carry, xs):
    cache, kept, count = carry
    token, time = xs
    logits, cache = model.apply(params, token[:, None], cache=cache)
    slot = jnp.minimum(count, positions.shape[1] - 1)
    is_query = positions[rows, slot] == time
    kept = kept.at[rows, slot].set(jnp.where(is_query[:, None], logits[:, 0], kept[rows, slot]))
    return (round_state(cache, fields), kept, count + is_query), None

  kept = jnp.zeros((n, positions.shape[1], model.config.vocab_size), jnp.float32)
  start = (as_carry(init_cache(model.config, n, t)), kept, jnp.zeros((n,), jnp.int32))
  (_, kept, _), _ = jax.lax.scan(step, start, (tokens.T, jnp.arange(t)))
  return kept


def compare(logits, reference, labels):
  """Accuracy, token agreement with `reference` and logit error, all [N, K, V] at the queries."""
  got, ref = np.asarray(logits), np.asarray(reference)
  return {"accuracy": float(np.mean(got.argmax(-1) == labels)),
          "agreement_with_float32": float(np.mean(got.argmax(-1) == ref.argmax(-1))),
          "logits_rel_l2_vs_float32": float(np.linalg.norm(got - ref) / np.linalg.norm(ref))}


def main(argv):
  del argv
  if not flags.FLAGS["verbosity"].present:  # keep Orbax's per-save INFO lines quiet
    logging.set_verbosity(logging.WARNING)
  run = get_run_config(_RUN.value)
  overrides = parse_assignments(ModelConfig, _MODEL_SET.value)
  config = get_config(run.model, **overrides)
  summary, state = train(run, config, _WORKDIR.value)
  print(f"model trained: step {summary['step']}, test mean {summary['test/mean']:.4f}")
  models = {name: LanguageModel(config.replace(dtype="float32", la_state_dtype=state_dtype))
            for name, (state_dtype, _) in VARIANTS.items()}
  model = models["float32"]
  try:
    slices = [mqar.MqarSlice(*(int(x) for x in name.split("x")), _EXAMPLES.value)
              for name in _SLICES.value]
  except (TypeError, ValueError) as e:
    raise app.UsageError(f"--slices must be seq_len x kv_pairs, e.g. 256x16: {e}") from e
  data = mqar.generate_mix(slices, split="test", vocab_size=run.vocab_size, seed=run.seed + 1)
  decode = jax.jit(decode_logits, static_argnums=(0, 4))
  forward = jax.jit(lambda p, x, at: model.apply(p, x, logits_at=at)[0])
  rows = []
  for spec, batch in zip(slices, data):
    start = time.time()
    tokens, at = jnp.asarray(batch.inputs), query_positions(batch.labels)
    labels = np.take_along_axis(batch.labels, at, axis=1)
    reference = decode(model, state.params, tokens, at, ())
    row = {"slice": spec.name, "examples": spec.num_examples,
           "full_forward": compare(forward(state.params, tokens, at), reference, labels)}
    for name, (_, fields) in VARIANTS.items():
      row[name] = compare(reference if name == "float32" else
                          decode(models[name], state.params, tokens, at, fields), reference,
                          labels)
    rows.append(row)
    print(f"{spec.name:>8s} ({time.time() - start:5.1f} s): " + ", ".join(
        f"{k} acc {v['accuracy']:.4f} agree {v['agreement_with_float32']:.4f} "
        f"err {v['logits_rel_l2_vs_float32']:.1e}" for k, v in row.items() if isinstance(v, dict)),
        flush=True)
  result = {"meta": {**run_metadata(), "run": _RUN.value, "model": run.model,
                     "model_overrides": overrides, "trained": summary,
                     "command": "python -m experiments.state_precision"}, "rows": rows}
  os.makedirs(os.path.dirname(_OUT.value) or ".", exist_ok=True)
  with open(_OUT.value, "w") as f:
    json.dump(result, f, indent=1)
  print(f"wrote {_OUT.value}")


if __name__ == "__main__":
  app.run(main)
