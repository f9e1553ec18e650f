"""Multi-document YAML that remembers where each value came from.

Config errors must name file and line, so documents keep their composed node tree next to the
plain data. Stricter than `yaml.safe_load_all` on purpose: duplicate keys, anchors/aliases and
merge keys are errors, because each one lets a file say something other than what it looks like
(and aliases allow billion-laughs expansion).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import yaml
from yaml.composer import ComposerError
from yaml.constructor import ConstructorError
from yaml.nodes import MappingNode, Node, SequenceNode

MAX_BYTES = 16 * 1024 * 1024

JsonPath = tuple[str | int, ...]


class YamlError(Exception):
    """line is 1-based; 0 means the error concerns the whole file (unreadable, too large)."""

    def __init__(self, path: str, line: int, message: str) -> None:
        super().__init__(f"{path}:{line}: {message}")
        self.path = path
        self.line = line
        self.message = message


@dataclass(frozen=True)
class Document:
    path: str
    index: int  # among the non-empty documents of the file, from 0
    obj: Any
    line: int  # 1-based
    # Absent for documents built in code; line_of then answers the document's own line.
    _root: Node | None = field(default=None, repr=False, compare=False)

    def line_of(self, json_path: JsonPath) -> int:
        """1-based line of the node at json_path, or of its nearest existing ancestor."""
        node, line = self._root, self.line
        for step in json_path:
            if isinstance(node, MappingNode):
                # Point at the key, not the value: a nested block value starts a line later.
                entry = next((kv for kv in node.value if _key_matches(kv[0], step)), None)
                if entry is None:
                    break
                line, node = entry[0].start_mark.line + 1, entry[1]
            elif isinstance(node, SequenceNode) and isinstance(step, int) and 0 <= step < len(node.value):
                node = node.value[step]
                line = node.start_mark.line + 1
            else:
                break
        return line


def _key_matches(key_node: Node, step: str | int) -> bool:
    # Keys are compared as written, so an int step also finds a key like `80:`.
    return not isinstance(key_node, (MappingNode, SequenceNode)) and key_node.value == str(step)


# The C parser composes a large routes file ~20x faster than the pure-Python one.
_BaseLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _refuse_aliases(root: Node) -> None:
    """An alias composes to a node object that appears twice in the tree: refuse it."""
    seen: set[int] = set()
    stack = [root]
    while stack:
        node = stack.pop()
        if id(node) in seen:
            raise ComposerError(None, None, "aliases are not allowed (no anchors or aliases)", node.start_mark)
        seen.add(id(node))
        if isinstance(node, MappingNode):
            for key, value in node.value:
                stack.append(key)
                stack.append(value)
        elif isinstance(node, SequenceNode):
            stack.extend(node.value)


class _StrictLoader(_BaseLoader):

    def construct_mapping(self, node, deep=False):
        first_seen: dict[Any, Node] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                raise ConstructorError(None, None, "merge keys (<<) are not allowed", key_node.start_mark)
            key = self.construct_object(key_node, deep=True)
            try:
                first = first_seen.setdefault(key, key_node)
            except TypeError:
                continue  # unhashable key: the base constructor reports it
            if first is not key_node:
                raise ConstructorError(
                    None, None,
                    f"duplicate key {key!r} (first defined on line {first.start_mark.line + 1})",
                    key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


def load_documents(path: str) -> list[Document]:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_BYTES + 1)
    except OSError as e:
        raise YamlError(path, 0, e.strerror or str(e)) from e
    if len(data) > MAX_BYTES:
        raise YamlError(path, 0, f"file is larger than {MAX_BYTES // (1024 * 1024)} MiB")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise YamlError(path, data[: e.start].count(b"\n") + 1, "file is not valid UTF-8") from e
    return load_documents_from_string(text, path)


def load_documents_from_string(text: str, path: str = "<string>") -> list[Document]:
    if len(text) > MAX_BYTES or len(text.encode("utf-8")) > MAX_BYTES:
        raise YamlError(path, 0, f"document is larger than {MAX_BYTES // (1024 * 1024)} MiB")
    documents: list[Document] = []
    loader = None
    try:
        loader = _StrictLoader(text)  # checks for forbidden characters up front
        while loader.check_node():
            root = loader.get_node()
            _refuse_aliases(root)
            obj = loader.construct_document(root)
            if obj is None:  # `---` followed by nothing (or only comments)
                continue
            line = root.start_mark.line + 1
            if not isinstance(obj, dict):
                raise YamlError(path, line, "document is not a mapping")
            documents.append(Document(path, len(documents), obj, line, root))
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        message = f"{e.context}: {e.problem}" if e.context and e.problem else (e.problem or e.context or str(e))
        raise YamlError(path, mark.line + 1 if mark else 0, message) from e
    except yaml.reader.ReaderError as e:  # a character YAML forbids; carries an offset, not a mark
        line = text.count("\n", 0, e.position) + 1
        raise YamlError(path, line, f"unacceptable character #x{e.character:04x}: {e.reason}") from e
    except RecursionError as e:
        raise YamlError(path, 0, "nesting is too deep") from e
    finally:
        if loader is not None:
            loader.dispose()
    return documents
