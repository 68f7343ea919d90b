"""Research tools that measure phi3 beside its peers and its runtimes; not part of the phi3cli package.

Run from the repository root: `python -m benchmarks.NAME --help`. They use phi3cli's public API only.
"""
