"""Conditions and the status the operator computes from what it observed."""
