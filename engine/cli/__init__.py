"""Command-line layer: parses arguments and calls the library / Snakemake; no logic."""
