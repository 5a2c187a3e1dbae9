"""lm-eval's command line with the `based_jax` model registered and the recall task configs
included: `python -m based_jax.evaluation run --model based_jax --model_args checkpoint=DIR
--tasks swde_v0` (any lm-eval flags; `--include_path` defaults to this package's tasks/)."""

import sys

from lm_eval.__main__ import cli_evaluate

from based_jax.evaluation.lm_eval_model import TASKS_DIR

if __name__ == "__main__":
  if not any(a == "--include_path" or a.startswith("--include_path=") for a in sys.argv[1:]):
    sys.argv += ["--include_path", TASKS_DIR]
  cli_evaluate()
