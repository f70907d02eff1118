"""`fleetserve` subcommands owned by the server package (each imports nothing heavy at import time)."""
