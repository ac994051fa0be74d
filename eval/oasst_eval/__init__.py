"""`oasst eval`: lm-eval-harness on a base model and its LoRA adapter, side by side, offline.

`cli.py` is the command, `run.py` loads the model (through `oasst_model.load`) and calls lm-eval, `taskset.py`
resolves task names, `data.py` and `tasks/` are the offline task configs, `report.py` writes and shows results.
"""
