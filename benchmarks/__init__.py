"""Data-plane benchmark harness for svcproxy (wrk vs direct, HAProxy, nginx stream, nft DNAT).

Run as root: ``python -m benchmarks.dataplane --help``.
"""
