"""Structures and batching, neighbour lists, input checks and file I/O."""
