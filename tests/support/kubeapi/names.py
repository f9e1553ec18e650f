"""The name rules of Kubernetes (apimachinery's util/validation), each returning its error messages."""

from __future__ import annotations

import re

_DNS1123_LABEL = "[a-z0-9]([-a-z0-9]*[a-z0-9])?"
_DNS1123_SUBDOMAIN = _DNS1123_LABEL + r"(\." + _DNS1123_LABEL + ")*"
_DNS1035_LABEL = "[a-z]([-a-z0-9]*[a-z0-9])?"
_QUALIFIED_NAME = "([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]"
_LABEL_VALUE = "(" + _QUALIFIED_NAME + ")?"

_DNS1123_LABEL_MESSAGE = (
    "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must "
    "start and end with an alphanumeric character (e.g. 'my-name',  or '123-abc', regex used for "
    f"validation is '{_DNS1123_LABEL}')"
)
_DNS1123_SUBDOMAIN_MESSAGE = (
    "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', "
    "and must start and end with an alphanumeric character (e.g. 'example.com', regex used for "
    f"validation is '{_DNS1123_SUBDOMAIN}')"
)
_DNS1035_LABEL_MESSAGE = (
    "a DNS-1035 label must consist of lower case alphanumeric characters or '-', start with an "
    "alphabetic character, and end with an alphanumeric character (e.g. 'my-name',  or 'abc-123', "
    f"regex used for validation is '{_DNS1035_LABEL}')"
)
_QUALIFIED_NAME_MESSAGE = (
    "name part must consist of alphanumeric characters, '-', '_' or '.', and must start and end with "
    "an alphanumeric character (e.g. 'MyName',  or 'my.name',  or '123-abc', regex used for "
    f"validation is '{_QUALIFIED_NAME}')"
)
_LABEL_VALUE_MESSAGE = (
    "a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.', "
    "and must start and end with an alphanumeric character (e.g. 'MyValue',  or 'my_value',  or "
    f"'12345', regex used for validation is '{_LABEL_VALUE}')"
)


def _full(pattern: str) -> re.Pattern[str]:
    return re.compile(f"^{pattern}$")


_IS_DNS1123_LABEL = _full(_DNS1123_LABEL)
_IS_DNS1123_SUBDOMAIN = _full(_DNS1123_SUBDOMAIN)
_IS_DNS1035_LABEL = _full(_DNS1035_LABEL)
_IS_QUALIFIED_NAME = _full(_QUALIFIED_NAME)
_IS_LABEL_VALUE = _full(_LABEL_VALUE)


def dns1123_label(value: str) -> list[str]:
    problems = [] if len(value) <= 63 else ["must be no more than 63 characters"]
    return problems + ([] if _IS_DNS1123_LABEL.match(value) else [_DNS1123_LABEL_MESSAGE])


def dns1123_subdomain(value: str) -> list[str]:
    problems = [] if len(value) <= 253 else ["must be no more than 253 characters"]
    return problems + ([] if _IS_DNS1123_SUBDOMAIN.match(value) else [_DNS1123_SUBDOMAIN_MESSAGE])


def dns1035_label(value: str) -> list[str]:
    problems = [] if len(value) <= 63 else ["must be no more than 63 characters"]
    return problems + ([] if _IS_DNS1035_LABEL.match(value) else [_DNS1035_LABEL_MESSAGE])


def qualified_name(value: str) -> list[str]:
    """A label or annotation key: an optional DNS subdomain prefix, '/', and a short name."""
    prefix, slash, name = value.rpartition("/")
    if slash and not prefix:
        return ["prefix part must be non-empty"]
    problems = [f"prefix part {message}" for message in dns1123_subdomain(prefix)] if slash else []
    if not name:
        return problems + ["name part must be non-empty"]
    if len(name) > 63:
        problems.append("name part must be no more than 63 characters")
    if not _IS_QUALIFIED_NAME.match(name):
        problems.append(_QUALIFIED_NAME_MESSAGE)
    return problems


def label_value(value: str) -> list[str]:
    problems = [] if len(value) <= 63 else ["must be no more than 63 characters"]
    return problems + ([] if _IS_LABEL_VALUE.match(value) else [_LABEL_VALUE_MESSAGE])


def iana_service_name(value: str) -> list[str]:
    """A named port (IANA_SVC_NAME): what a Service targetPort or a container port name may be."""
    problems = [] if len(value) <= 15 else ["must be no more than 15 characters"]
    if not re.fullmatch("[-a-z0-9]+", value):
        problems.append("must contain only alpha-numeric characters (a-z, 0-9), and hyphens (-)")
    if "--" in value:
        problems.append("must not contain consecutive hyphens")
    if not re.search("[a-z]", value):
        problems.append("must contain at least one letter (a-z)")
    if value.startswith("-") or value.endswith("-"):
        problems.append("must not begin or end with a hyphen")
    return problems
