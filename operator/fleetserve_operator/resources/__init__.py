"""Builders of the child objects: pure functions from spec (+ memory fit) to manifests."""
