"""The `icpgate` command line: argument parsing, one function per command, exit codes, the demo.

The top of the house: it may import every other package, and nothing imports it.
"""
