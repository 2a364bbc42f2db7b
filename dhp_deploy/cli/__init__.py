r"""Command-line entry points, one module per command: ``dhp-train``, ``dhp-export``, ``dhp-serve``."""
