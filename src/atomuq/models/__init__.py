"""The model protocol, the derived quantities computed on top of it, the native model and its files."""
