"""The ``fastdiff`` command line (click)."""
