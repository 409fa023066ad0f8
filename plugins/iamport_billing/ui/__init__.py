"""The Billing page (FastAPI app mounted by the Airflow plugin) and its links."""
