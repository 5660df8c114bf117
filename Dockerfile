# The dynastudy image of the compose stack (docker-compose.yml): the Ray head and GPU workers, the MLflow server, the
# dashboard and the one-shot `sweep` service all run it. torch comes from PyPI's default Linux wheels, which are
# CUDA builds: the same image trains on the workers' GPUs and runs on CPU elsewhere.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# The volumes are mounted on these paths; a new named volume takes the owner of the image's folder, so the
# non-root user can write to it.
RUN useradd --create-home --uid 1000 dynastudy \
    && mkdir -p /opt/dynastudy /results /mlartifacts /mlflow-auth \
    && chown dynastudy:dynastudy /results /mlartifacts /mlflow-auth
WORKDIR /opt/dynastudy

# Dependencies first, read from pyproject.toml alone, so that editing the code does not reinstall torch (GBs).
# psycopg2-binary: PostgreSQL for MLflow and Optuna; boto3: S3 artifacts; ray[default]: the Ray dashboard;
# mlflow[auth]: Flask-WTF, without which `mlflow server --app-name basic-auth` cannot start.
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt psycopg2-binary boto3 "ray[default]" "mlflow[auth]" \
    && rm /tmp/requirements.txt

COPY README.md ./
COPY study ./study
COPY search_spaces ./search_spaces
COPY trainables ./trainables
COPY dashboards ./dashboards
RUN pip install --no-deps . && rm -rf build *.egg-info
COPY docker/sweep.sh /usr/local/bin/dynastudy-sweep.sh
COPY docker/mlflow/basic_auth.ini /etc/mlflow/basic_auth.ini

USER dynastudy
ENV HOME=/home/dynastudy DYNASTUDY_HOME=/results
CMD ["dynastudy", "--help"]
