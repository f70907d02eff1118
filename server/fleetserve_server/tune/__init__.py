"""`fleetserve tune`: replay a fleet's own workload against the real server over a search of engine
settings, and recommend the setting, the replicas and the device that serve it under an objective.

``workload`` reads the workload (the server's JSON request log, or distributions), ``search`` holds
the pure logic (grid, objective, capacity search, recommendation, patch), ``trials`` starts real
servers and replays the workload against them, ``report`` prints the table and draws the frontier.
"""
