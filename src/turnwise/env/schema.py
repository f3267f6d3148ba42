"""A small JSON Schema validator for tool arguments, and a schema differ.

It covers the subset that OpenAI function schemas use: `type` (one name or a list),
`enum`, `const`, `properties`, `required`, `additionalProperties`, `items`, `minItems`,
`maxItems`, `minLength`, `maxLength`, `pattern`, `minimum`, `maximum`, `exclusiveMinimum`,
`exclusiveMaximum`, `anyOf`, `oneOf`, `allOf`, and local `$ref` (`#/$defs/...`,
`#/definitions/...`). Other keywords (`format`, `description`, `default`, ...) are
accepted and ignored. Departure from the spec: none for these keywords; an integer-valued
float (1.0) counts as an integer, as the spec says; booleans are never numbers.

No dependency: `jsonschema` pulls in a compiled extension (`rpds-py`).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

_TYPE_NAMES = {
    bool: "boolean", int: "integer", float: "number", str: "string",
    type(None): "null", list: "array", dict: "object",
}


def _type_of(value: Any) -> str:
    for py, name in _TYPE_NAMES.items():
        if type(value) is py:
            return name
    return type(value).__name__


def _is_type(value: Any, name: str) -> bool:
    if name == "integer":
        return (type(value) is int) or (type(value) is float and value.is_integer())
    if name == "number":
        return type(value) in (int, float)
    return _type_of(value) == name


def _resolve(ref: str, root: Mapping[str, Any]) -> Mapping[str, Any]:
    if not ref.startswith("#/"):
        raise ValueError(f"only local $ref is supported, got {ref!r}")
    node: Any = root
    for part in ref[2:].split("/"):
        node = node[part.replace("~1", "/").replace("~0", "~")]
    return node


def validate(value: Any, schema: Mapping[str, Any], root: Mapping[str, Any] | None = None,
             path: str = "$") -> list[str]:
    """Every violation of `schema` by `value`, as `path: message` lines (empty when valid)."""
    root = schema if root is None else root
    if "$ref" in schema:
        return validate(value, _resolve(schema["$ref"], root), root, path)
    errors: list[str] = []
    types = schema.get("type")
    if types is not None:
        names = [types] if isinstance(types, str) else list(types)
        if not any(_is_type(value, n) for n in names):
            return [f"{path}: expected {' or '.join(names)}, got {_type_of(value)}"]
    if "enum" in schema and not any(_same(value, e) for e in schema["enum"]):
        errors.append(f"{path}: must be one of {list(schema['enum'])}, got {value!r}")
    if "const" in schema and not _same(value, schema["const"]):
        errors.append(f"{path}: must be {schema['const']!r}, got {value!r}")
    if isinstance(value, dict):
        errors += _validate_object(value, schema, root, path)
    elif isinstance(value, list):
        errors += _validate_array(value, schema, root, path)
    elif isinstance(value, str):
        if len(value) < schema.get("minLength", 0):
            errors.append(f"{path}: shorter than {schema['minLength']} characters")
        if "maxLength" in schema and len(value) > schema["maxLength"]:
            errors.append(f"{path}: longer than {schema['maxLength']} characters")
        if "pattern" in schema and not re.search(schema["pattern"], value):
            errors.append(f"{path}: does not match pattern {schema['pattern']!r}")
    elif type(value) in (int, float):
        errors += _validate_number(value, schema, path)
    for sub in schema.get("allOf", ()):
        errors += validate(value, sub, root, path)
    if "anyOf" in schema and all(validate(value, s, root, path) for s in schema["anyOf"]):
        errors.append(f"{path}: matches none of the allowed shapes (anyOf)")
    if "oneOf" in schema:
        matches = sum(1 for s in schema["oneOf"] if not validate(value, s, root, path))
        if matches != 1:
            errors.append(f"{path}: must match exactly one shape (oneOf), matches {matches}")
    return errors


def _same(a: Any, b: Any) -> bool:
    return _type_of(a) == _type_of(b) and a == b or (
        type(a) in (int, float) and type(b) in (int, float) and a == b)


def _validate_object(value: dict, schema: Mapping[str, Any], root: Mapping[str, Any], path: str) -> list[str]:
    errors = [f"{path}: missing required property {k!r}" for k in schema.get("required", ()) if k not in value]
    props: Mapping[str, Any] = schema.get("properties", {})
    extra = schema.get("additionalProperties", True)
    for key, item in value.items():
        sub = f"{path}.{key}"
        if key in props:
            errors += validate(item, props[key], root, sub)
        elif extra is False:
            errors.append(f"{path}: unexpected property {key!r} (allowed: {sorted(props)})")
        elif isinstance(extra, Mapping):
            errors += validate(item, extra, root, sub)
    return errors


def _validate_array(value: list, schema: Mapping[str, Any], root: Mapping[str, Any], path: str) -> list[str]:
    errors = []
    if len(value) < schema.get("minItems", 0):
        errors.append(f"{path}: fewer than {schema['minItems']} items")
    if "maxItems" in schema and len(value) > schema["maxItems"]:
        errors.append(f"{path}: more than {schema['maxItems']} items")
    if isinstance(schema.get("items"), Mapping):
        for i, item in enumerate(value):
            errors += validate(item, schema["items"], root, f"{path}[{i}]")
    return errors


def _validate_number(value: float, schema: Mapping[str, Any], path: str) -> list[str]:
    errors = []
    if "minimum" in schema and value < schema["minimum"]:
        errors.append(f"{path}: must be >= {schema['minimum']}, got {value}")
    if "maximum" in schema and value > schema["maximum"]:
        errors.append(f"{path}: must be <= {schema['maximum']}, got {value}")
    if "exclusiveMinimum" in schema and value <= schema["exclusiveMinimum"]:
        errors.append(f"{path}: must be > {schema['exclusiveMinimum']}, got {value}")
    if "exclusiveMaximum" in schema and value >= schema["exclusiveMaximum"]:
        errors.append(f"{path}: must be < {schema['exclusiveMaximum']}, got {value}")
    return errors


def schema_diff(actual: Any, expected: Any, path: str = "$") -> list[str]:
    """Differences between two JSON values (tool schemas), as `path: ...` lines.

    `turnwise verify` uses it to check an environment's tools against the production
    schema file. Object keys are compared as sets; lists element by element.
    """
    if isinstance(actual, Mapping) and isinstance(expected, Mapping):
        out = [f"{path}.{k}: missing" for k in sorted(set(expected) - set(actual))]
        out += [f"{path}.{k}: unexpected" for k in sorted(set(actual) - set(expected))]
        for k in sorted(set(actual) & set(expected)):
            out += schema_diff(actual[k], expected[k], f"{path}.{k}")
        return out
    if isinstance(actual, list) and isinstance(expected, list):
        if len(actual) != len(expected):
            return [f"{path}: {len(actual)} items, expected {len(expected)}"]
        return [d for i, (a, e) in enumerate(zip(actual, expected, strict=True))
                for d in schema_diff(a, e, f"{path}[{i}]")]
    return [] if _same(actual, expected) else [f"{path}: {actual!r} != expected {expected!r}"]


def load_schemas(path: str | os.PathLike[str]) -> dict[str, dict[str, Any]]:
    """A production tools file (the one `verify.production_schemas` names: JSON or YAML, a list
    of OpenAI tool entries or `{"tools": [...]}`), by tool name, each entry as written, for
    `@tool(schema=schemas["name"])`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"tool schema file not found: {path}")
    text = path.read_text(encoding="utf-8")
    if path.suffix in (".yaml", ".yml"):
        import yaml
        value = yaml.safe_load(text)
    else:
        value = json.loads(text)
    if isinstance(value, Mapping) and "tools" in value:
        value = value["tools"]
    if not isinstance(value, list) or not all(isinstance(t, Mapping) for t in value):
        raise ValueError(f"{path}: expected a list of OpenAI tool schemas, got {type(value).__name__}")
    out: dict[str, dict[str, Any]] = {}
    for t in value:
        spec = t.get("function", t)
        if not isinstance(spec, Mapping) or "name" not in spec:
            raise ValueError(f"{path}: a tool entry has no function name: {json.dumps(t)[:120]}")
        out[str(spec["name"])] = dict(t)
    return out
