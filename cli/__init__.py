"""The `darkroom` command line."""
