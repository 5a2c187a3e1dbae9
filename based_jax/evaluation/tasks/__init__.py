"""lm-eval task configs of the paper's recall tasks (`<task>_v0.yaml`) and the functions they
name (`utils.py`): pass this directory as lm-eval's `include_path`."""
