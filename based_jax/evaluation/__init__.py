"""Zero-shot evaluation of based-jax language models.

  recall_tasks    the paper's recall tasks (SWDE, FDA, SQuAD completion): rows, prompt, metric
  runner          runs them: truncated prompts -> batched greedy generation -> `contains`
  generation      batched greedy generation of ragged prompts with per-row stop tokens
  loglikelihood   per-token log-probabilities, scored spans, rolling windows (perplexity)
  batching        length buckets and token-budget batches shared by the two above
  model_loading   a checkpoint's config and parameters, checked against each other
  lm_eval_model   the lm-evaluation-harness model `based_jax` (needs the `eval` extra)
  tasks/          the recall tasks as lm-eval task configs (`include_path`)
"""

from based_jax.evaluation.generation import greedy_generate, stop_token_mask
from based_jax.evaluation.loglikelihood import (rolling_logprobs, rolling_windows, score_spans,
                                                score_tokens, token_logprobs)
from based_jax.evaluation.model_loading import check_params, load_model
from based_jax.evaluation.recall_tasks import TASKS, contains, get_task, load_rows
from based_jax.evaluation.runner import Report, markdown_table, model_generator, run_recall
