"""The `fleetserve` command line: one console script, one subcommand per part."""
