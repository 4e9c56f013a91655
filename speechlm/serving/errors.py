"""Errors as OpenAI's API writes them: ``{"error": {"message", "type", "param", "code"}}`` with an HTTP status.

The official clients raise by status (400 BadRequestError, 401 AuthenticationError, 404 NotFoundError,
429 RateLimitError, ...) and show ``message``, so the message names the field and what would be valid.
"""

from __future__ import annotations

from typing import Any


class APIError(Exception):
    """A request the server refuses (or could not answer), with what to tell the client."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, *, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def validation_error(errors: list[dict[str, Any]]) -> APIError:
    """A 400 from pydantic's validation errors of the request body; the first one names the field."""
    first = errors[0]
    location = [str(part) for part in first.get("loc", ()) if part != "body"]
    param = _param_path(location) or None
    kind = first.get("type", "")
    if kind == "json_invalid":
        return bad_request(f"the request body is not valid JSON ({first.get('ctx', {}).get('error', first['msg'])})",
                           code="invalid_json")
    if kind == "extra_forbidden":
        return bad_request(f"Unrecognized request argument supplied: {param}", param=param,
                           code="unknown_parameter")
    if kind == "missing":
        return bad_request(f"Missing required parameter: '{param}'.", param=param, code="missing_required_parameter")
    if not location:
        return bad_request(f"the request body must be a JSON object ({first['msg']})", code="invalid_request")
    value = first.get("input")
    shown = f" (got {value!r:.80})" if value is not None and not isinstance(value, (dict, list)) else ""
    more = f"; and {len(errors) - 1} more problem(s)" if len(errors) > 1 else ""
    return bad_request(f"Invalid value for '{param}': {first['msg']}{shown}{more}", param=param,
                       code="invalid_value")


def _param_path(location: list[str]) -> str:
    """``["messages", "0", "content"]`` -> ``messages[0].content``, as OpenAI names nested params."""
    path = ""
    for part in location:
        path += f"[{part}]" if part.isdigit() else (f".{part}" if path else part)
    return path
