"""Log setup (JSON or text lines) and the one-line-per-request structured log.

The request log never contains prompt or completion text unless the server
runs with ``--log-prompts``: prompts are user data and often confidential.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import asdict
from typing import Any

from fleetserve_server.capture import SampleCapture
from fleetserve_server.engine.interfaces import RequestOutputDelta
from fleetserve_server.engine.sampling_params import SamplingParams

REQUEST_LOGGER = "fleetserve.request"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, plus any ``extra={"fields": {...}}``."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            line.update(fields)
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            text += " " + json.dumps(fields, default=str)
        return text


def configure_logging(fmt: str, level: int = logging.INFO) -> None:
    """Route fleetserve's and uvicorn's loggers to stderr in ``fmt`` (json|text)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # uvicorn's per-request access log duplicates the request log; keep its errors.
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)
    for name in ("uvicorn", "uvicorn.error"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True


class RequestLogger:
    """Writes the structured record of each finished request to the ``fleetserve.request`` logger."""

    def __init__(self, model: str, log_prompts: bool, capture: SampleCapture | None = None) -> None:
        self.model = model
        self.log_prompts = log_prompts
        self.capture = capture  # --capture-path: a sample of these records, with text, redacted
        self._log = logging.getLogger(REQUEST_LOGGER)

    @property
    def keeps_text(self) -> bool:
        """Whether the routes must hand over the prompt (for the log, or for the capture)."""
        return self.log_prompts or self.capture is not None

    def finished(
        self,
        *,
        request_id: str,
        engine_request_id: str,
        endpoint: str,
        params: SamplingParams,
        final: RequestOutputDelta | None,
        finish_reason: str,
        prompt_tokens: int,
        completion_tokens: int,
        arrival: float,
        prompt: Any = None,
        completion: str | None = None,
        token_logprobs: list[float] | None = None,
    ) -> dict[str, Any]:
        fields: dict[str, Any] = {
            "event": "request_finished",
            "request_id": request_id,
            "engine_request_id": engine_request_id,
            "endpoint": endpoint,
            "model": self.model,
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "cached_prompt_tokens": final.cached_prompt_tokens if final else 0,
            "queue_time_s": _round(final.queue_time if final else None),
            "ttft_s": _round(final.time_to_first_token if final else None),
            "e2e_s": _round(final.e2e_latency if final else time.monotonic() - arrival),
            "finish_reason": finish_reason,
            "sampling": asdict(params),
        }
        if final is not None and final.error:
            fields["error"] = final.error
        if self.log_prompts:
            fields["prompt"] = prompt
            fields["completion"] = completion
        self._log.info("request finished", extra={"fields": fields})
        if self.capture is not None and self.capture.sampled():
            try:  # the answer was served: a sample that cannot be written must not turn it into an error
                self.capture.record(fields, prompt=prompt, output=completion, token_logprobs=token_logprobs)
            except Exception:
                self._log.exception("capturing request %s failed", request_id)
        return fields


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 6)
