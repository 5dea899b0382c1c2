"""Measured lut_linear vs qlinear times per (bits, N, K, M): the automatic choice's table.

Placeholder until ``fastadapt bench lut_linear --write-table`` regenerates this file.
"""
COMMAND = ""
DEVICE = ""
TABLE: dict = {}
