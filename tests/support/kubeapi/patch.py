"""PATCH bodies: JSON merge patch (RFC 7386), strategic merge (map merge only), JSON patch (RFC 6902)."""

from __future__ import annotations

import copy
import json
from typing import Any

from gateway.devstack.cluster_store import merge_patch  # RFC 7386, as the dev stand-in applies it

from .status import bad_request, unprocessable, unsupported_media_type

JSON_PATCH = "application/json-patch+json"
MERGE_PATCH = "application/merge-patch+json"
STRATEGIC_MERGE_PATCH = "application/strategic-merge-patch+json"
APPLY_PATCH = "application/apply-patch+yaml"


def apply_patch(current: dict, content_type: str, body: bytes, *, strategic: bool) -> dict:
    """The patched copy of `current`. Custom resources refuse strategic merge (`strategic=False`)."""
    media_type = content_type.split(";")[0].strip().lower()
    accepted = [JSON_PATCH, MERGE_PATCH] + ([STRATEGIC_MERGE_PATCH] if strategic else [])
    if media_type not in accepted:
        raise unsupported_media_type(media_type, accepted + [APPLY_PATCH])
    try:
        patch = json.loads(body or b"null")
    except ValueError as error:
        raise bad_request(f"error decoding patch: {error}") from None
    if media_type == JSON_PATCH:
        return json_patch(current, patch)
    if not isinstance(patch, dict):
        raise bad_request(f"json: cannot unmarshal {_json_type(patch)} into Go value of type map[string]interface {{}}")
    if media_type == STRATEGIC_MERGE_PATCH:
        patch = _without_directives(patch)
    return merge_patch(current, patch)


def _without_directives(patch: Any) -> Any:
    # `$patch`, `$setElementOrder/...` steer list merging, which this double does not do.
    if isinstance(patch, dict):
        return {k: _without_directives(v) for k, v in patch.items() if not k.startswith("$")}
    return patch


def json_patch(document: dict, operations: Any) -> dict:
    """RFC 6902, all six operations; a failed `test` or a missing path is a 422 like the server's."""
    if not isinstance(operations, list):
        raise bad_request(
            f"json: cannot unmarshal {_json_type(operations)} into Go value of type jsonpatch.Patch"
        )
    result = copy.deepcopy(document)
    for operation in operations:
        result = _apply_operation(result, operation)
    return result


def _apply_operation(document: Any, operation: Any) -> Any:
    if not isinstance(operation, dict) or "op" not in operation or "path" not in operation:
        raise bad_request(f"invalid JSON patch operation: {json.dumps(operation)}")
    op, path = operation["op"], operation["path"]
    if op in ("add", "replace", "test") and "value" not in operation:
        raise unprocessable(f"missing value for {op} operation at {path}")
    match op:
        case "add":
            return _add(document, path, copy.deepcopy(operation["value"]))
        case "remove":
            return _remove(document, path)[0]
        case "replace":
            document, _ = _remove(document, path)
            return _add(document, path, copy.deepcopy(operation["value"]))
        case "move":
            document, value = _remove(document, _from(operation))
            return _add(document, path, value)
        case "copy":
            return _add(document, path, copy.deepcopy(_get(document, _from(operation))))
        case "test":
            if _get(document, path) != operation["value"]:
                raise unprocessable(f"testing value {path} failed: test failed")
            return document
    raise bad_request(f'Unexpected kind: {op}')


def _from(operation: dict) -> str:
    if "from" not in operation:
        raise unprocessable(f"missing from for {operation['op']} operation")
    return operation["from"]


def _tokens(pointer: str) -> list[str]:
    if pointer == "":
        return []
    if not pointer.startswith("/"):
        raise unprocessable(f"JSON pointer must start with '/': {pointer!r}")
    return [t.replace("~1", "/").replace("~0", "~") for t in pointer[1:].split("/")]


def _index(container: list, token: str, pointer: str, *, append: bool = False) -> int:
    if append and token == "-":
        return len(container)
    limit = len(container) if append else len(container) - 1
    if not token.isdigit() or int(token) > limit:
        raise unprocessable(f"unable to access invalid index: {token} in {pointer}")
    return int(token)


def _parent(document: Any, pointer: str) -> tuple[Any, str]:
    tokens = _tokens(pointer)
    if not tokens:
        raise unprocessable("the whole document cannot be the target of this operation")
    node = document
    for token in tokens[:-1]:
        if isinstance(node, dict) and token in node:
            node = node[token]
        elif isinstance(node, list):
            node = node[_index(node, token, pointer)]
        else:
            raise unprocessable(f"doc is missing path: {pointer}: missing value")
    return node, tokens[-1]


def _get(document: Any, pointer: str) -> Any:
    if pointer == "":
        return document
    parent, token = _parent(document, pointer)
    if isinstance(parent, dict) and token in parent:
        return parent[token]
    if isinstance(parent, list):
        return parent[_index(parent, token, pointer)]
    raise unprocessable(f"doc is missing path: {pointer}: missing value")


def _add(document: Any, pointer: str, value: Any) -> Any:
    if pointer == "":
        return value
    parent, token = _parent(document, pointer)
    if isinstance(parent, dict):
        parent[token] = value
    elif isinstance(parent, list):
        parent.insert(_index(parent, token, pointer, append=True), value)
    else:
        raise unprocessable(f"doc is missing path: {pointer}: missing value")
    return document


def _remove(document: Any, pointer: str) -> tuple[Any, Any]:
    parent, token = _parent(document, pointer)
    if isinstance(parent, dict) and token in parent:
        return document, parent.pop(token)
    if isinstance(parent, list):
        return document, parent.pop(_index(parent, token, pointer))
    raise unprocessable(f"doc is missing path: {pointer}: missing value")


def _json_type(value: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "bool", type(None): "null"}.get(
        type(value), "number"
    )
