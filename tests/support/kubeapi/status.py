"""metav1.Status bodies exactly as a real API server writes them, and the exception that carries one."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .field_errors import FieldError

if TYPE_CHECKING:
    from .catalog import ResourceType

CONFLICT_MODIFIED = (
    "the object has been modified; please apply your changes to the latest version and try again"
)


class ApiError(Exception):
    """The double answers with `status` (a metav1.Status) instead of an object."""

    def __init__(self, status: dict):
        super().__init__(f"{status['code']} {status['reason']}: {status['message']}")
        self.status = status

    @property
    def code(self) -> int:
        return self.status["code"]


def failure(code: int, reason: str, message: str, details: dict | None = None) -> dict:
    """Keys in the server's order; `details` is left out when absent, as Go's omitempty does."""
    body = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure"}
    body["message"] = message
    body["reason"] = reason
    if details is not None:
        body["details"] = details
    body["code"] = code
    return body


def _details(name: str, rtype: ResourceType, kind: str, **extra) -> dict:
    details = {"name": name} if name else {}
    if rtype.group:
        details["group"] = rtype.group
    details["kind"] = kind
    details.update(extra)
    return details


def not_found(rtype: ResourceType, name: str) -> ApiError:
    details = _details(name, rtype, rtype.plural)
    return ApiError(failure(404, "NotFound", f'{rtype.group_resource} "{name}" not found', details))


def already_exists(rtype: ResourceType, name: str) -> ApiError:
    details = _details(name, rtype, rtype.plural)
    return ApiError(failure(409, "AlreadyExists", f'{rtype.group_resource} "{name}" already exists', details))


def conflict(rtype: ResourceType, name: str, why: str = CONFLICT_MODIFIED) -> ApiError:
    message = f'Operation cannot be fulfilled on {rtype.group_resource} "{name}": {why}'
    return ApiError(failure(409, "Conflict", message, _details(name, rtype, rtype.plural)))


def invalid(rtype: ResourceType, name: str, errors: list[FieldError]) -> ApiError:
    listed = str(errors[0]) if len(errors) == 1 else "[" + ", ".join(str(e) for e in errors) + "]"
    message = f'{rtype.group_kind} "{name}" is invalid: {listed}'
    details = _details(name, rtype, rtype.kind, causes=[error.cause() for error in errors])
    return ApiError(failure(422, "Invalid", message, details))


def bad_request(message: str) -> ApiError:
    return ApiError(failure(400, "BadRequest", message))


def unauthorized() -> ApiError:
    return ApiError(failure(401, "Unauthorized", "Unauthorized"))


def path_not_found() -> ApiError:
    return ApiError(failure(404, "NotFound", "the server could not find the requested resource", {}))


def method_not_allowed() -> ApiError:
    message = "the server does not allow this method on the requested resource"
    return ApiError(failure(405, "MethodNotAllowed", message, {}))


def unsupported_media_type(content_type: str, accepted: list[str]) -> ApiError:
    message = (
        f"the body of the request was in an unknown format - accepted media types include: "
        f"{', '.join(accepted)}"
    )
    return ApiError(failure(415, "UnsupportedMediaType", message, {}))


def unprocessable(message: str) -> ApiError:
    """A patch that cannot be applied (RFC 6902 `test` failed, a path that does not exist)."""
    return ApiError(failure(422, "Invalid", message, {}))


def expired(message: str) -> dict:
    """Sent inside a watch ERROR event, not as a response: no details, as the server does."""
    return failure(410, "Expired", message)


def internal_error(message: str) -> ApiError:
    details = {"causes": [{"message": message}]}
    return ApiError(failure(500, "InternalError", f"Internal error occurred: {message}", details))


def deleted(rtype: ResourceType, obj: dict) -> dict:
    """What a DELETE of a custom resource answers: Success, naming the resource by its plural."""
    metadata = obj["metadata"]
    details = _details(metadata["name"], rtype, rtype.plural, uid=metadata["uid"])
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "details": details}
