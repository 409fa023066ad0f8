"""Recurring card billing through Iamport (PortOne V1) on Apache Airflow."""

__version__ = "0.1.0"
