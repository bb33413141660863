"""The `fedtune` command line: the top layer, the only one that imports every other."""
