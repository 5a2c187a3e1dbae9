"""The implementation resolvers say what runs: `based_jax.implementations` for every path of a
model, checked against the functions the model calls (on a CPU; a CUDA GPU simulated where
the answer depends on one), and the resolvers' answers to bad input and to fallbacks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from implementation_spies import spy_implementations

from based_jax import config as config_lib
from based_jax.cache import init_cache
from based_jax.config import get_config
from based_jax.implementations import implementations, linear_attention_implementation
from based_jax.mixers import attention
from based_jax.model import LanguageModel, init_params, make_mixer
from pallas_kernels.taylor_attention import api, triton_decode

F16 = dict(la_feature_dim=16)  # the kernels' feature dim (based_tiny has F = 8)
BF16 = dict(dtype="bfloat16")  # what cuDNN attention needs


def simulate_cuda(monkeypatch) -> None:
  """A Hopper GPU as the resolvers see it."""
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  monkeypatch.setattr(attention, "_on_cuda", lambda: True)
  monkeypatch.setattr(api, "on_hopper", lambda: True)


def paths_run(config, calls) -> dict:
  """{mixer: {path: implementation}} of what a prefill in two chunks and a decode step call
  (shapes only: nothing is computed), read from the spies' `calls`."""
  model = LanguageModel(config)
  params = jax.eval_shape(lambda: init_params(config))
  b, t = 2, 8
  # (tokens, the path each mixer takes): a fresh cache, then a filled one, then one token.
  steps = [(t, {"linear_attention": "chunked", "attention": "prefill"}),
           (t, {"linear_attention": "chunked", "attention": "chunked_prefill"}),
           (1, {"linear_attention": "decode", "attention": "decode"})]
  mixers = {"linear_attention" if kind == config_lib.LINEAR_ATTENTION else "attention"
            for kind in config.layer_kinds if kind != config_lib.BASE_CONV}
  ran = {mixer: {} for mixer in mixers}
  cache = init_cache(config, b, 3 * t)
  for tokens, paths in steps:
    calls.clear()
    _, cache = jax.eval_shape(
        lambda p, c, n=tokens: model.apply(p, jnp.zeros((b, n), jnp.int32), cache=c),
        params, cache)
    for mixer in mixers:
      seen = {impl for m, impl in calls if m == mixer}
      assert len(seen) == 1, (mixer, paths[mixer], seen)
      ran[mixer].setdefault(paths[mixer], set()).update(seen)
  return {mixer: {path: impl.pop() for path, impl in by_path.items() if len(impl) == 1}
          for mixer, by_path in ran.items()}


@pytest.mark.parametrize("preset, overrides, cuda, want", [
    ("based_tiny", {}, False, dict(la="xla", la_decode="xla", prefill="xla")),
    ("based_tiny", dict(**F16, linear_attention_impl="pallas_interpret"), False,
     dict(la="pallas_interpret", la_decode="pallas_interpret", prefill="xla")),
    # K = 16 <= DECODE_XLA_MAX_VALUE_DIM: decode steps on XLA, measured faster; 16-bit
    # chunked calls on the (simulated) Hopper GPU take the Mosaic forward.
    ("based_tiny", dict(**F16, **BF16), True, dict(la="mosaic", la_decode="xla",
                                                    prefill="cudnn")),
    ("based_tiny", dict(**F16, **BF16, d_model=512, attention_decode_impl="cudnn"), True,
     dict(la="mosaic", la_decode="pallas", prefill="cudnn", decode="cudnn")),
    ("based_tiny", dict(**F16, **BF16, linear_attention_impl="pallas"), True,
     dict(la="pallas", la_decode="pallas", prefill="cudnn")),
    ("based_tiny", dict(**F16, linear_attention_impl="triton"), True,
     dict(la="pallas", la_decode="triton", prefill="xla")),  # float32: no cuDNN
    ("based_tiny", dict(**F16, **BF16, linear_attention_impl="mosaic"), True,
     dict(la="mosaic", la_decode="pallas", prefill="cudnn")),
    ("transformer_pp_tiny", BF16, True, dict(prefill="cudnn")),
])
def test_the_model_runs_what_implementations_reports(monkeypatch, preset, overrides, cuda,
                                                      want):
  if cuda:
    simulate_cuda(monkeypatch)
  monkeypatch.setattr(triton_decode, "available", lambda: True)
  config = get_config(preset, **overrides)
  reported = implementations(config)
  expected = {"attention": {"prefill": want["prefill"],
                            "decode": want.get("decode", "pallas" if cuda and
                                               not config.attention_layers else "xla"),
                            "chunked_prefill": "xla"}}
  if "la" in want:
    expected["linear_attention"] = {"chunked": want["la"], "decode": want["la_decode"]}
  expected["norm"] = {"add_rms_norm": "pallas" if cuda else "xla"}
  expected["gemv"] = {"one_row": "pallas" if cuda else "xla"}
  assert reported == expected
  mixers = {k: v for k, v in reported.items() if k not in ("norm", "gemv")}
  assert paths_run(config, spy_implementations(monkeypatch)) == mixers


def test_a_gpu_fallback_for_the_kernels_limits_is_reported_and_warned(monkeypatch):
  simulate_cuda(monkeypatch)
  monkeypatch.setattr(api, "_warned", set())
  with pytest.warns(UserWarning, match="falling back to XLA for feature dim F=8"):
    assert linear_attention_implementation(get_config("based_tiny"), "chunked") == "xla"


def test_a_cudnn_rejection_under_auto_warns_and_an_explicit_cudnn_raises(monkeypatch):
  # The resolver does not ask cuDNN; a call cuDNN rejects must not run XLA silently.
  simulate_cuda(monkeypatch)
  real = jax.nn.dot_product_attention

  def rejecting(*args, implementation=None, **kwargs):
    if implementation == "cudnn":
      raise NotImplementedError("cuDNN: unsupported here")
    return real(*args, implementation=implementation, **kwargs)

  monkeypatch.setattr(jax.nn, "dot_product_attention", rejecting)
  config = get_config("based_tiny", **BF16)
  assert attention.resolve_implementation(config, "prefill") == "cudnn"
  xla_mixer = make_mixer(config.replace(attention_impl="xla"), config_lib.SLIDING_WINDOW,
                         "mixer")
  x = jax.random.normal(jax.random.key(0), (2, 5, config.d_model))
  positions = jnp.broadcast_to(jnp.arange(5), (2, 5))
  params = xla_mixer.init(jax.random.key(1), x, positions, None, None)
  mixer = make_mixer(config, config_lib.SLIDING_WINDOW, "mixer")
  with pytest.warns(UserWarning, match="cuDNN rejected this call.*unsupported here"):
    y, _ = mixer.apply(params, x, positions, None, None)
  np.testing.assert_array_equal(y, xla_mixer.apply(params, x, positions, None, None)[0])
  explicit = make_mixer(config.replace(attention_impl="cudnn"), config_lib.SLIDING_WINDOW,
                        "mixer")
  with pytest.raises(NotImplementedError, match="unsupported here"):
    explicit.apply(params, x, positions, None, None)


def test_resolvers_name_bad_input():
  facts = dict(feature_dim=16, value_dim=64, dtypes=("float32",) * 3,
               state_dtypes=("float32", "float32"), backend="cpu")
  with pytest.raises(ValueError, match="impl must be one of"):
    api.resolve("cuda", **facts, decoding=False)
  with pytest.raises(ValueError, match="a decode step needs a state"):
    api.resolve("auto", **{**facts, "state_dtypes": None}, decoding=True)
  with pytest.raises(ValueError, match=r"dtypes must be those of \(q, k, v\)"):
    api.resolve("auto", **{**facts, "dtypes": ("float32",)}, decoding=False)
  with pytest.raises(ValueError, match="needs a GPU"):
    api.resolve("pallas", **facts, decoding=False)
  with pytest.raises(ValueError, match="impl='mosaic' needs a GPU.*use 'mosaic_interpret'"):
    api.resolve("mosaic", **facts, decoding=False)
  with pytest.raises(ValueError, match="takes bfloat16 or float16 q, k, v.*got float32"):
    api.resolve("mosaic", **{**facts, "backend": "gpu"}, decoding=False)
  assert not api.on_hopper()  # this machine's CPU device
  config = get_config("based_tiny")
  with pytest.raises(ValueError, match="path must be one of"):
    attention.resolve_implementation(config, "chunked")
  with pytest.raises(ValueError, match="path must be one of"):
    linear_attention_implementation(config, "prefill")
  assert "linear_attention" not in implementations(get_config("transformer_pp_tiny"))


# based_tiny's d' 8 is outside the kernels' limits: on the simulated GPU its linear attention
# falls back to XLA with a warning, which the fallback test above checks.
@pytest.mark.filterwarnings("ignore:causal_taylor_attention. falling back:UserWarning")
def test_the_residual_norm_implementation_is_reported(monkeypatch):
  config = get_config("based_tiny")
  assert implementations(config)["norm"] == {"add_rms_norm": "xla"}
  assert implementations(config.replace(norm_impl="pallas_interpret"))["norm"] == {
      "add_rms_norm": "pallas_interpret"}
  simulate_cuda(monkeypatch)
  assert implementations(config.replace(norm_impl="pallas"))["norm"] == {
      "add_rms_norm": "pallas"}
  assert implementations(config)["norm"] == {"add_rms_norm": "pallas"}  # "auto" on a GPU
  zoology = config.replace(block_style="zoology")  # LayerNorms: the kernels compute RMSNorm
  assert implementations(zoology)["norm"] == {"add_rms_norm": "pallas", "layer_norm": "xla"}
