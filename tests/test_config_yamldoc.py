import textwrap

import pytest
import yaml

from gateway.config import yamldoc
from gateway.config.yamldoc import Document, YamlError, load_documents, load_documents_from_string


def load(text: str) -> list[Document]:
    return load_documents_from_string(textwrap.dedent(text), "routes.yaml")


def error_of(text: str) -> YamlError:
    with pytest.raises(YamlError) as info:
        load(text)
    return info.value


ROUTE = """\
    # leading comment
    apiVersion: gateway.networking.k8s.io/v1
    kind: HTTPRoute
    metadata:
      name: api
    spec:
      rules:
      - name: first
        matches:
        - path: {type: PathPrefix, value: /a}
        - headers:
          - name: x
            value: "1"
      - backendRefs:
          - name: svc
            port: 8080
    """


def test_line_of_nested_paths():
    (doc,) = load(ROUTE)
    assert doc.line == 2
    assert doc.line_of(()) == 2
    assert doc.line_of(("metadata", "name")) == 5
    assert doc.line_of(("spec",)) == 6  # the key's line, not where its block value starts
    assert doc.line_of(("spec", "rules", 0)) == 8
    assert doc.line_of(("spec", "rules", 0, "matches", 1)) == 11
    assert doc.line_of(("spec", "rules", 0, "matches", 1, "headers", 0, "value")) == 13
    assert doc.line_of(("spec", "rules", 1, "backendRefs", 0, "port")) == 16


def test_line_of_falls_back_to_nearest_ancestor():
    (doc,) = load(ROUTE)
    assert doc.line_of(("spec", "rules", 0, "timeouts", "request")) == 8
    assert doc.line_of(("spec", "rules", 7, "name")) == 7
    assert doc.line_of(("metadata", "name", "deeper")) == 5
    assert doc.line_of(("nope",)) == 2


def test_line_of_finds_non_string_keys_by_their_text():
    (doc,) = load("""\
        ports:
          80: http
          "443": https
        """)
    assert doc.obj == {"ports": {80: "http", "443": "https"}}
    assert doc.line_of(("ports", 80)) == 2
    assert doc.line_of(("ports", "443")) == 3


def test_documents_count_only_non_empty_and_keep_their_lines():
    docs = load("""\
        ---
        ---
        # only a comment
        ---
        a: 1
        ---
        b:
          c: 2
        ---
        """)
    assert [(d.index, d.obj, d.line) for d in docs] == [(0, {"a": 1}, 5), (1, {"b": {"c": 2}}, 7)]
    assert docs[1].line_of(("b", "c")) == 8
    assert all(d.path == "routes.yaml" for d in docs)


def test_empty_text_gives_no_documents():
    assert load("") == []
    assert load("# nothing\n") == []


def test_obj_is_what_safe_load_gives():
    text = "a: 2024-01-02\nb: [1, 2.5, true, null, '3']\nc: 0x10\nd: yes\n"
    (doc,) = load_documents_from_string(text)
    assert doc.obj == yaml.safe_load(text)
    assert doc.path == "<string>"


def test_duplicate_key_is_an_error_with_its_line():
    error = error_of("""\
        spec:
          rules: []
          hostnames: []
          rules: [1]
        """)
    assert error.line == 4
    assert "duplicate key 'rules'" in error.message
    assert "line 2" in error.message
    assert str(error) == f"routes.yaml:4: {error.message}"


def test_duplicate_key_spelled_differently_is_still_a_duplicate():
    error = error_of("name: a\n'name': b\n")
    assert (error.line, error.message) == (2, "duplicate key 'name' (first defined on line 1)")


def test_same_key_in_sibling_mappings_is_fine():
    (doc,) = load("items:\n- name: a\n- name: b\n")
    assert doc.obj == {"items": [{"name": "a"}, {"name": "b"}]}


def test_aliases_and_anchors_are_rejected():
    laughs = """\
        a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]
        b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]
        c: [*b, *b, *b, *b, *b, *b, *b, *b, *b]
        """
    error = error_of(laughs)
    assert error.line == 1
    assert "aliases are not allowed" in error.message

    error = error_of("a: 1\nb:\n  - *x\n")
    assert error.line == 3
    assert "alias" in error.message


def test_merge_keys_are_rejected():
    error = error_of("a:\n  <<: {b: 1}\n  c: 2\n")
    assert (error.line, error.message) == (2, "merge keys (<<) are not allowed")


def test_syntax_error_reports_its_line():
    error = error_of("""\
        a: 1
        b:
          c: 2
         d: 3
        """)
    assert error.line == 4
    assert error.path == "routes.yaml"
    assert "block mapping" in error.message


def test_syntax_error_in_a_later_document_keeps_the_file_line():
    error = error_of("a: 1\n---\nb: [1, 2\nc: 3\n")
    assert error.line == 4


def test_document_that_is_not_a_mapping():
    error = error_of("a: 1\n---\n- 1\n- 2\n")
    assert (error.line, error.message) == (3, "document is not a mapping")
    assert error_of("just text\n").message == "document is not a mapping"


def test_control_characters_are_reported_with_their_line():
    error = error_of("a: 1\nb: \x07\n")
    assert error.line == 2
    assert "#x0007" in error.message


def test_unsafe_tags_are_refused():
    error = error_of("a: !!python/object/apply:os.system ['true']\n")
    assert error.line == 1
    assert "could not determine a constructor" in error.message


def test_load_documents_reads_a_file(tmp_path):
    path = tmp_path / "routes.yaml"
    path.write_text("a: 1\n---\nb: 2\n")
    docs = load_documents(str(path))
    assert [(d.path, d.obj, d.line) for d in docs] == [(str(path), {"a": 1}, 1), (str(path), {"b": 2}, 3)]


def test_load_documents_rejects_large_files(tmp_path):
    path = tmp_path / "big.yaml"
    path.write_bytes(b"#" * (yamldoc.MAX_BYTES + 1))
    with pytest.raises(YamlError) as info:
        load_documents(str(path))
    assert info.value.line == 0
    assert "larger than 16 MiB" in info.value.message


def test_load_documents_rejects_invalid_utf8_with_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_bytes(b"a: 1\nb: \xff\n")
    with pytest.raises(YamlError) as info:
        load_documents(str(path))
    assert (info.value.line, info.value.message) == (2, "file is not valid UTF-8")


def test_load_documents_missing_file(tmp_path):
    with pytest.raises(YamlError) as info:
        load_documents(str(tmp_path / "absent.yaml"))
    assert info.value.line == 0
    assert "No such file" in info.value.message


def test_documents_built_in_code_answer_their_own_line():
    doc = Document("x.yaml", 0, {"a": 1}, 7)
    assert doc.line_of(("a",)) == 7
