#!/bin/sh
# Creates the MLflow and Optuna databases (names from MLFLOW_DB and OPTUNA_DB) on the first start of the postgres
# service. The postgres image runs this once, as the database superuser, on an empty data volume only: renaming a
# database later means creating it by hand (or starting from a fresh volume).
set -eu
: "${MLFLOW_DB:?MLFLOW_DB is not set}"
: "${OPTUNA_DB:?OPTUNA_DB is not set}"
if [ "$MLFLOW_DB" = "$OPTUNA_DB" ]; then
    # Both stores would migrate their own tables into one schema; keep them apart.
    echo "postgres-init: MLFLOW_DB and OPTUNA_DB are both '$MLFLOW_DB': they must differ" >&2
    exit 1
fi
for db in "$MLFLOW_DB" "$OPTUNA_DB"; do
    # One of them may equal POSTGRES_DB, which the image has already created.
    psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname postgres -v db="$db" <<'SQL'
SELECT format('CREATE DATABASE %I', :'db') WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = :'db')\gexec
SQL
done
