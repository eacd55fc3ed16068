"""Command-line interface (thin: parse, show progress, call the library, write files)."""
