"""The OpenAI-compatible HTTP layer. It talks only to an ``EngineClient``.

``create_app`` (in ``app``) is the entry point; routes live one family per
module (chat, completions, models, health), request/response models in
``protocol``.
"""
