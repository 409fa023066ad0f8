# Airflow 3.3 with this distribution installed: the provider (the "iamport" connection type),
# the Billing page plugin (entry point airflow.plugins), the emulator and the DAGs.
FROM apache/airflow:3.3.2

USER root
COPY --chown=airflow:0 pyproject.toml README.md /opt/iamport-billing/
COPY --chown=airflow:0 plugins /opt/iamport-billing/plugins
COPY --chown=airflow:0 dags /opt/airflow/dags
USER airflow
RUN mkdir -p /opt/airflow/emulator

# Pin Airflow to the image's version so pip cannot up- or downgrade it.
RUN pip install --no-cache-dir "apache-airflow==${AIRFLOW_VERSION}" /opt/iamport-billing
