"""Host names: normalisation (IDNA, ports, trailing dots, IP literals) and the Public Suffix List.
A leaf: imports nothing from icpgate.
"""
