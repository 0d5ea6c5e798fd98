"""Errors as OpenAI's API shapes them, so every OpenAI client understands them.

``{"error": {"message", "type", "param", "code"}}`` with the status the
``openai`` package maps to its exception classes (400 BadRequestError, 401
AuthenticationError, 404 NotFoundError, 429 RateLimitError, 503
InternalServerError).
"""

from __future__ import annotations

import json

from aiohttp import web


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.retry_after_s = retry_after_s

    def body(self) -> dict[str, object]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self) -> web.Response:
        headers = {}
        if self.retry_after_s is not None:
            headers["Retry-After"] = str(max(1, round(self.retry_after_s)))
        return web.Response(
            status=self.status,
            text=json.dumps(self.body()),
            content_type="application/json",
            headers=headers,
        )


def bad_request(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code="invalid_value" if param else None)


def unauthorized() -> ApiError:
    return ApiError(
        401,
        "Incorrect API key provided. Send it as 'Authorization: Bearer <token>'.",
        code="invalid_api_key",
    )


def model_not_found(model: str) -> ApiError:
    return ApiError(
        404, f"The model '{model}' does not exist.", param="model", code="model_not_found"
    )


def rate_limited(message: str, retry_after_s: float) -> ApiError:
    return ApiError(
        429,
        message,
        type="rate_limit_error",
        code="rate_limit_exceeded",
        retry_after_s=retry_after_s,
    )


def loading(model: str, retry_after_s: float = 2.0) -> ApiError:
    return ApiError(
        503,
        f"The model '{model}' is loading; try again shortly.",
        type="server_error",
        code="model_loading",
        retry_after_s=retry_after_s,
    )


def unavailable(message: str) -> ApiError:
    return ApiError(503, message, type="server_error", code="unavailable", retry_after_s=2.0)
