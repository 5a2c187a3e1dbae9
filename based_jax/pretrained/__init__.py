"""Released PyTorch checkpoints (BASED 360M / 1.3B) in and out of based-jax.

  config, params = from_pretrained("hazyresearch/based-360m")   # or an HF model directory
  export_pretrained(config, params, "exported/my_model")        # config.json + safetensors

`hf_config` maps config.json <-> ModelConfig, `keys` the state-dict names and layouts <-> our
parameter tree, `torch_pickle` reads `pytorch_model.bin` without PyTorch (tensors only), and
`hub` reads and writes model directories (and fetches Hub ids). docs/checkpoints.md has the
mapping and its conventions.
"""

from based_jax.pretrained.hub import export_pretrained, from_pretrained
