"""fleetserve's prefix-aware router: an async OpenAI-API proxy in front of one LLMDeployment's
server pods that sends a request to the replica most likely to hold its prompt's prefix in its KV
cache (bounded by load), and holds requests while no replica is ready (scale-from-zero).

Shaped like llm-d's endpoint picker: ``discovery`` (EndpointSlices) and ``load`` (each replica's
/metrics) feed an endpoint table; ``prompt`` + ``prefix_index`` estimate cache hits; ``scoring``
filters, scores and picks; ``hold`` queues requests while nothing is ready; ``proxy`` is the
HTTP layer. Never imports torch.
"""
