"""Research and speed benchmarks: scripts, not part of the installed fedtune package."""
