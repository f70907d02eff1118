"""The engine: scheduling, KV block management and the step loop.

Nothing in this package imports torch, an HTTP framework or prometheus_client;
the model runner (``fleetserve_server.runner``) is reached only through the
``ModelRunner`` protocol in ``interfaces``.
"""
