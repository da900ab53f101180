"""The OpenAI-compatible server: routes in :mod:`.app`, request bodies in :mod:`.types`, the
queue in front of the engine in :mod:`.runner`."""

from cmc_edge.runtime.server.app import ServerLimits, ServerSettings, create_app, is_loopback, serve

__all__ = ["ServerLimits", "ServerSettings", "create_app", "is_loopback", "serve"]
