#!/bin/sh
# Entry point of the compose `sweep` service: `docker compose run --rm sweep --method elastic --study NAME ...`,
# or `docker compose run --rm sweep resume --study NAME`.
# A Ray driver must run on a node of its cluster (ray.init(address=...) looks for a raylet on the local machine),
# so this container first joins the cluster as a node with no CPUs and no GPUs: trials are never placed here.
# Then it becomes `dynastudy sweep` (exec, so Ctrl-C and the service's stop signal SIGINT reach the sweep itself,
# which ends its MLflow and Optuna records before it exits).
set -eu
: "${RAY_ADDRESS:?RAY_ADDRESS is not set}" "${MLFLOW_TRACKING_URI:?MLFLOW_TRACKING_URI is not set}" \
  "${DYNASTUDY_STORAGE:?DYNASTUDY_STORAGE is not set}"
ray start --address="$RAY_ADDRESS" --num-cpus=0 --num-gpus=0 --disable-usage-stats >/dev/null
# `docker compose run --rm sweep resume --study NAME` continues an interrupted sweep instead (same services).
command=sweep
if [ "${1:-}" = resume ]; then
    command=resume
    shift
fi
# Arguments given to `run` come last, so they may override these three.
exec dynastudy "$command" --ray-address "$RAY_ADDRESS" --tracking-uri "$MLFLOW_TRACKING_URI" --storage "$DYNASTUDY_STORAGE" "$@"
