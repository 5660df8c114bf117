"""Everything that runs inside a trial: data, models, losses, cost accounting, exit policies, the training loop
and the thin Ray Tune adapter. Nothing here but `tune_adapter.py` imports Ray."""
