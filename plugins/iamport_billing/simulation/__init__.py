"""Simulated time for the whole billing system: ``iamport-billing simulate``."""
