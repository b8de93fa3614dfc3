"""The pnn-cluster subcommands, one module each; ``cli`` finds them by name."""


class UsageError(Exception):
    """Bad arguments or configuration: exit code 2 with a clear message."""
