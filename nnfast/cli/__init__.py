"""Command-line interface (``nnfast`` with subcommands); the only place that prints."""
