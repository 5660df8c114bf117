"""Study execution and queries: the sweep spec and runner, MLflow tracking layout, Pareto and best-config
queries, and the `dynastudy` command line."""
