"""`fleetserve` subcommands owned by the operator package."""
