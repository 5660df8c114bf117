"""The web dashboard (`dynastudy dashboard`) and the static report (`dynastudy report`): Pareto, trial, compare
and search views over what sweeps write to MLflow."""
