"""The decode benchmark times the real generation path (its tokens equal reference greedy), its
floors count the right bytes and FLOPs, and its sweep stops cleanly at the first out-of-memory
batch, recording it, also when a child process dies."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from based_jax.model import LanguageModel, count_params, init_params
from experiments import bench_decode, child_process, decode_floors
from experiments.benchmarking import model_config
from pallas_kernels.taylor_attention import feature_width, pallas_chunked, pallas_decode

OOM = "RESOURCE_EXHAUSTED: Out of memory while trying to allocate 21.40GiB with allocator GPU_0_bfc"


@pytest.mark.parametrize("preset, chunk", [("based_tiny", None), ("transformer_pp_tiny", None),
                                           ("transformer_pp_tiny", 4)])
def test_benchmark_generation_equals_reference_greedy(preset, chunk):
  config = model_config(preset, "float32").replace(init_std=0.3)
  params = init_params(config, seed=4)
  prompts = jax.random.randint(jax.random.key(0), (3, 9), 0, config.vocab_size, jnp.int32)
  tokens, prefill_s, decode_s = bench_decode.run_generation(config, params, prompts, 7,
                                                            prefill_chunk=chunk)
  assert prefill_s > 0 and decode_s > 0
  model = LanguageModel(config)
  seqs = np.asarray(prompts).tolist()
  forward = jax.jit(lambda p, t: model.apply(p, t)[0])
  for step in range(7):  # greedy by full causal forwards (padded: one compilation), no cache
    padded = jnp.asarray([row + [0] * (7 - step) for row in seqs])
    logits = forward(params, padded)[:, 9 + step - 1]
    for row, token in zip(seqs, np.asarray(jnp.argmax(logits, -1))):
      row.append(int(token))
  np.testing.assert_array_equal(tokens, np.asarray(seqs)[:, 9:])


def test_out_of_memory_is_recognised():
  assert child_process.is_oom(RuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating"))
  assert not child_process.is_oom(ValueError("shapes do not match"))


def test_floor_counts_weights_and_state():
  config = model_config("based_tiny", "float32")
  one = decode_floors.bytes_per_step(config, 1, 16, 16, param_bytes=1000)
  two = decode_floors.bytes_per_step(config, 2, 16, 16, param_bytes=1000)
  assert two - one == one - 1000 > 0  # state bytes scale with the batch, weights do not


def test_floors_only_counts_a_bf16_state_as_half_the_taylor_bytes():
  rows = decode_floors.floors(["based_tiny", "based_tiny+la_state_dtype=bfloat16"], [4],
                              "float32", 16, 16, bandwidth=1e12, peak_flops=0)
  f32, bf16 = (r["floor_breakdown"] for r in rows)
  assert f32["weights"] == bf16["weights"] > 0
  config = model_config("based_tiny", "float32")
  e = feature_width(config.la_feature_dim)
  kv = sum(4 * 4 * config.la_heads * e * (config.d_model // config.la_heads)  # B=4, float32
           for kind in config.layer_kinds if kind == "linear_attention")
  assert f32["state_written"] - bf16["state_written"] == kv // 2
  assert rows[0]["floor_ms_per_step"] == 1e3 * f32["total"] / 1e12


def test_compute_floor_counts_two_flops_per_weight_per_token():
  rows = decode_floors.floors(["based_tiny"], [4, 8], "float32", 16, 16, bandwidth=1e12,
                              peak_flops=1e12)
  params = count_params(model_config("based_tiny", "float32"))
  for row in rows:  # the weight matmuls plus a little mixer work
    assert 1.0 < row["flops_per_step"] / (2 * row["batch"] * params) < 1.2
    assert row["compute_floor_ms_per_step"] == pytest.approx(row["flops_per_step"] / 1e9)
    assert row["roofline_ms_per_step"] == max(row["compute_floor_ms_per_step"],
                                              row["floor_ms_per_step"])
  assert rows[1]["flops_per_step"] == pytest.approx(2 * rows[0]["flops_per_step"], rel=1e-3)
  assert "flops_per_step" not in decode_floors.floors(["based_tiny"], [4], "float32", 16, 16,
                                                      bandwidth=1e12, peak_flops=0)[0]


def test_compute_floor_is_counted_on_the_cpu_from_a_gpu_process(monkeypatch):
  # The count lowers the step for the CPU; with the default backend a GPU, every "auto"
  # implementation would pick a GPU kernel the CPU cannot lower (the norms, the selective scan).
  want = decode_floors.flops_per_step(model_config("based_tiny", "float32"), 4, 32)
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  for spec in ("based_tiny", "mqar_mamba"):
    config = model_config(spec, "float32")
    assert decode_floors.flops_per_step(config, 4, 32) > 0
  assert decode_floors.flops_per_step(model_config("based_tiny", "float32"), 4, 32) == want


def test_floor_reads_the_valid_kv_cache_once():
  config = model_config("transformer_pp_tiny", "bfloat16")  # 2 layers, d 64
  floor = decode_floors.bytes_breakdown(config, 4, 100, 20, param_bytes=0)
  slot = 2 * 64 * 2 * 4  # K and V of one position, 4 rows
  assert floor["state_read"] == 2 * (100 + 21 / 2) * slot  # mean over steps of P + i + 1
  assert floor["state_written"] == 2 * slot
  assert floor["kv_dense_read"] == 2 * 120 * slot


def fake_points(fail):
  """A run_point that records its calls (batch, chunk[, row block]) and raises OutOfMemory
  where fail(batch, chunk, rows per prefill call) says."""
  calls = []

  def run_point(batch, chunk, row_block):
    calls.append((batch, chunk) if row_block is None else (batch, chunk, row_block))
    phase = fail(batch, chunk, bench_decode.row_block_for(batch, row_block))
    if phase:
      raise child_process.OutOfMemory(phase, OOM)
    return {"batch": batch, "prefill_chunk": chunk, "prefill_row_block": row_block,
            "prefill_ms": 1.0,
            "decode_ms_per_step": 1.0, "tokens_per_s": 1000.0 * batch,
            "floor_ms_per_step": 0.5, "ratio_to_floor": 2.0, "peak_memory_gb": 1.0}
  return run_point, calls


def test_sweep_stops_at_the_first_out_of_memory_batch_and_records_it():
  run_point, calls = fake_points(lambda b, c, r: "decode" if b >= 8 else None)
  result = bench_decode.sweep("m", [1, 2, 4, 8, 16, 32], run_point, 256, 1024, log=lambda s: None)
  assert [r["batch"] for r in result["rows"]] == [1, 2, 4]
  assert result["oom"]["batch"] == 8 and result["oom"]["phase"] == "decode"
  assert "21.40GiB" in result["oom"]["error"]
  assert calls == [(1, 256), (2, 256), (4, 256), (8, 256)]  # nothing after the OOM batch
  assert result["best"]["batch"] == 4 and result["error"] is None


def test_prefill_out_of_memory_retries_smaller_chunks_then_row_blocks_before_stopping():
  # The prefill fits while rows per call * chunk <= 4096 tokens; decoding below batch 512.
  run_point, calls = fake_points(
      lambda b, c, r: "prefill" if r * min(c, 1024) > 4096 else "decode" if b >= 512 else None)
  result = bench_decode.sweep("m", [1, 4, 16, 64, 128, 256, 512], run_point, 1024, 1024,
                              log=lambda s: None)
  assert [(r["batch"], r["prefill_chunk"], r["prefill_row_block"]) for r in result["rows"]] == [
      (1, 1024, None), (4, 1024, None), (16, 256, None), (64, 64, None), (128, 64, 64),
      (256, 64, 64)]
  assert [(r["batch"], r["prefill_chunk"], r["prefill_row_block"])
          for r in result["prefill_retries"]] == [(16, 1024, None), (64, 256, None),
                                                  (128, 64, None)]
  assert result["oom"] == {"batch": 512, "prefill_chunk": 64, "prefill_row_block": 64,
                           "phase": "decode", "error": OOM}
  assert calls[-1] == (512, 64, 64)
  # Past the smallest chunk and row block (or a block that no longer divides), it stops.
  assert bench_decode.smaller_prefill(64, 64, 128, 1024) is None
  assert bench_decode.smaller_prefill(64, None, 96, 1024) is None
  assert bench_decode.smaller_prefill(64, None, 192, 1024) == (64, 96)


def test_sweep_through_the_real_point_stops_at_a_simulated_oom(monkeypatch):
  real_run = bench_decode.Generation.run

  def run(self, params, prompts, seed=0):
    if self.batch >= 2:  # the device "runs out" during decoding from batch 2 on
      self._decode = lambda *a: (_ for _ in ()).throw(RuntimeError(OOM))
    return real_run(self, params, prompts, seed)

  monkeypatch.setattr(bench_decode.Generation, "run", run)
  point = dict(spec="transformer_pp_tiny", prompt_len=8, new_tokens=3, dtype="float32",
               repeats=1, bandwidth=1e9)
  result = bench_decode.sweep(
      "transformer_pp_tiny", [1, 2, 4],
      lambda b, c, r: bench_decode.measure_point(**point, batch=b, prefill_chunk=c,
                                                 prefill_row_block=r), 8, 8,
      log=lambda s: None)
  assert [r["batch"] for r in result["rows"]] == [1]
  assert result["oom"]["batch"] == 2 and result["oom"]["phase"] == "decode"
  row = result["rows"][0]
  assert row["implementations"] == {
      "attention": dict(prefill="xla", decode="xla", chunked_prefill="xla"),
      "norm": {"add_rms_norm": "xla"}, "gemv": {"one_row": "xla"}}
  assert row["floor_bytes_per_step"] > row["param_bytes"] > 0
  # transformer_pp_tiny: 2 layers of K and V [1, H=4, S=8 + 3, 16] float32 and positions [1, S]
  assert row["cache_bytes_per_sequence"] == {"attention": 2 * (2 * 4 * 11 * 16 * 4 + 11 * 4),
                                             "length": 4}


def test_isolated_child_that_dies_of_oom_is_an_oom(monkeypatch):
  # A child process that aborts (no response written) with an allocator message on stderr.
  monkeypatch.setattr(child_process, "_spawn",
                      lambda *a, **k: (None, f"F0000 fatal\n{OOM}\nAborted", -6))
  with pytest.raises(child_process.OutOfMemory, match="21.40GiB"):
    child_process.run_child(bench_decode.CHILD_MODULE, {"task": "point", "point": {}}, 0.9, 60)


def test_model_process_that_dies_keeps_its_rows_and_records_the_running_batch(monkeypatch):
  partial = {"model": "m", "rows": [{"batch": 1, "tokens_per_s": 5.0}], "oom": None,
             "error": None, "prefill_retries": [], "prefill_chunk": 1024}
  response = {"result": partial,
              "running": bench_decode.point_settings(batch=2, chunk=1024, row_block=None)}
  seen = []

  def fake_spawn(module, request, mem_fraction, timeout_s, on_progress=None):
    assert module == bench_decode.CHILD_MODULE
    assert request["task"] == "sweep" and mem_fraction == 0.9
    on_progress(response)
    return response, f"...\n{OOM}\n", -6

  monkeypatch.setattr(child_process, "_spawn", fake_spawn)
  result = bench_decode.summarise(child_process.sweep_in_child(
      bench_decode.CHILD_MODULE, {"task": "sweep", "sweep": {}}, 0.9, 60, seen.append,
      initial=bench_decode.new_result("m", 1024, None)))
  assert seen and seen[0]["rows"] == partial["rows"]
  assert result["complete"] and [r["batch"] for r in result["rows"]] == [1]
  assert result["oom"]["batch"] == 2 and "21.40GiB" in result["oom"]["error"]
  assert result["best"]["batch"] == 1


def test_a_model_child_sweeps_reporting_each_point_before_it_runs(tmp_path, monkeypatch):
  # The child's side of --isolate=model: what a dying child leaves behind is its last response.
  response_path = tmp_path / "response.json"
  run_point, calls = fake_points(lambda b, c, r: "decode" if b >= 2 else None)
  in_flight = []

  def fake_measure(params_cache, **point):
    in_flight.append(json.loads(response_path.read_text()))
    return run_point(point["batch"], point["prefill_chunk"], point["prefill_row_block"])

  monkeypatch.setattr(bench_decode, "measure_point", fake_measure)
  args = {"point": {"spec": "m", "prompt_len": 1024}, "batches": [1, 2, 4], "first_chunk": 256,
          "first_row_block": None, "previous": None, "deadline": 0}
  request_path = tmp_path / "request.json"
  request_path.write_text(json.dumps({"task": "sweep", "sweep": args,
                                      "response": str(response_path)}))
  child_process.serve(str(request_path), bench_decode.handle_request)
  assert [r["running"] for r in in_flight] == [bench_decode.point_settings(b, 256, None)
                                               for b in (1, 2)]
  assert in_flight[0]["result"] is None
  assert [r["batch"] for r in in_flight[1]["result"]["rows"]] == [1]
  final = json.loads(response_path.read_text())
  assert final["done"] and [r["batch"] for r in final["result"]["rows"]] == [1]
  assert final["result"]["oom"]["batch"] == 2 and calls == [(1, 256), (2, 256)]


def test_batch_sizes_double_until_the_limit():
  assert bench_decode.batch_sizes([], 40) == [1, 2, 4, 8, 16, 32]
  assert bench_decode.batch_sizes(["3", "5"], 40) == [3, 5]


def test_model_specs_carry_config_overrides():
  config = model_config("transformer_pp_tiny+attention_decode_impl=cudnn+window=7", "bfloat16")
  assert config.attention_decode_impl == "cudnn" and config.window == 7
  assert config.dtype == config.param_dtype == "bfloat16"
  assert bench_decode.auto_prefill_chunk(config, 1024) == 1024  # full attention: one call
  assert bench_decode.auto_prefill_chunk(model_config("based_tiny", "float32"), 1024) == 256


def test_sweep_stopped_by_the_deadline_continues_where_it_stopped():
  run_point, calls = fake_points(lambda b, c, r: "decode" if b >= 16 else None)
  saved = []
  first = bench_decode.sweep("m", [1, 2, 4, 8, 16, 32], run_point, 256, 1024,
                             log=lambda s: None, save=saved.append,
                             stop=lambda: len(calls) >= 2)
  assert not first["complete"] and [r["batch"] for r in first["rows"]] == [1, 2]
  assert saved and saved[-1]["rows"] == first["rows"]  # saved after every point
  again = bench_decode.sweep("m", [1, 2, 4, 8, 16, 32], run_point, 256, 1024,
                             log=lambda s: None, previous=first)
  assert again["complete"] and [r["batch"] for r in again["rows"]] == [1, 2, 4, 8]
  assert again["oom"]["batch"] == 16
  assert calls == [(1, 256), (2, 256), (4, 256), (8, 256), (16, 256)]  # nothing ran twice


def test_a_sparser_earlier_sweep_is_filled_in_below_its_oom_batch():
  run_point, calls = fake_points(lambda b, c, r: "decode" if b >= 16 else None)
  quick = bench_decode.sweep("m", [1, 4, 16], run_point, 256, 1024, log=lambda s: None)
  assert quick["oom"]["batch"] == 16
  full = bench_decode.sweep("m", [1, 2, 4, 8, 16, 32], run_point, 256, 1024,
                            log=lambda s: None, previous=quick)
  assert [r["batch"] for r in full["rows"]] == [1, 2, 4, 8] and full["oom"]["batch"] == 16
  assert calls == [(1, 256), (4, 256), (16, 256), (2, 256), (8, 256)]
  assert bench_decode.pending_batches(full, [1, 2, 4, 8, 16, 32]) == []


def test_point_records_the_implementations_its_generation_runs(monkeypatch):
  # The FLOP count runs every mixer on XLA; the row must still name the implementations the
  # timed generation used, and the kernels must be what that generation called.
  called = []

  def spy(real, name):
    def call(*args, **kwargs):
      called.append((name, kwargs["interpret"]))
      return real(*args, **kwargs)
    return call

  for module, name in ((pallas_chunked, "chunked"), (pallas_decode, "step")):
    monkeypatch.setattr(module, name, spy(getattr(module, name), name))
  jax.clear_caches()  # trace afresh, through the spies
  row = bench_decode.measure_point(
      "based_tiny+la_feature_dim=16+linear_attention_impl=pallas_interpret", 2, prompt_len=8,
      new_tokens=2, dtype="float32", repeats=1, prefill_chunk=8, bandwidth=1e9, peak_flops=1e12)
  assert row["flops_per_step"] > 0
  assert row["implementations"] == {
      "linear_attention": {"chunked": "pallas_interpret", "decode": "pallas_interpret"},
      "attention": {"prefill": "xla", "decode": "xla", "chunked_prefill": "xla"},
      "norm": {"add_rms_norm": "xla"}, "gemv": {"one_row": "xla"}}
  assert set(called) == {("chunked", True), ("step", True)}  # the interpreted kernels ran
