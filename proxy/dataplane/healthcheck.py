"""healthCheckNodePort servers for externalTrafficPolicy: Local Services (kube-proxy's rules).

Each answers any path with 200 when this node has a local ready endpoint for the Service and the
proxy is healthy, else 503, with kube-proxy's JSON body and headers, so cloud load balancers
send external traffic only to nodes that can serve it locally.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable

from aiohttp import web

from proxy.model import NamespacedName
from proxy.plan import ListenerKey

logger = logging.getLogger(__name__)


class ServiceHealthServers:
    def __init__(self, proxy_healthy: Callable[[], bool]) -> None:
        self._proxy_healthy = proxy_healthy
        self.local_endpoints: dict[NamespacedName, int] = {}
        self._runners: dict[ListenerKey, web.AppRunner] = {}

    async def open(self, key: ListenerKey, service: NamespacedName) -> None:
        """Serve ``service``'s health on ``key``; raises OSError when it cannot bind."""

        async def handle(_: web.Request) -> web.Response:
            count = self.local_endpoints.get(service, 0)
            healthy = self._proxy_healthy()
            body = {"service": {"namespace": service.namespace, "name": service.name},
                    "localEndpoints": count, "serviceProxyHealthy": healthy}
            return web.json_response(body, status=200 if count and healthy else 503, headers={
                "X-Content-Type-Options": "nosniff", "X-Load-Balancing-Endpoint-Weight": str(count)})

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handle)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        sock = socket.socket(socket.AF_INET6 if ":" in key.ip else socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((key.ip, key.port))
            await web.SockSite(runner, sock).start()
        except BaseException:
            sock.close()
            await runner.cleanup()
            raise
        self._runners[key] = runner

    async def close(self, key: ListenerKey) -> None:
        runner = self._runners.pop(key, None)
        if runner is not None:
            await asyncio.shield(runner.cleanup())

    async def close_all(self) -> None:
        for key in list(self._runners):
            await self.close(key)
