"""Reconcile: observe, plan (pure), execute."""
