"""svcproxy: a userspace kube-proxy on asyncio and uvloop."""

__version__ = "0.1.0"
