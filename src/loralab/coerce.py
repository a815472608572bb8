"""Check and convert one config value against its type hint (Literal, Union, list, dict, bool,
int, float, str); a mismatch is a user error naming the config key."""

from __future__ import annotations

import types
from typing import Any, Literal, Union, get_args, get_origin

from .errors import LoralabError


def coerce(value: Any, tp: Any, key: str) -> Any:
    """Check/convert `value` to type `tp`; raise LoralabError naming `key` otherwise."""
    origin = get_origin(tp)
    if value is None and not (origin in (Union, types.UnionType) and type(None) in get_args(tp)):
        raise LoralabError(
            f"'{key}' cannot be null: it is not an optional setting (null clears only those "
            f"whose default is null). Give a value ({_type_name(tp)}), or leave the key out for its default."
        )
    if origin is Literal:
        allowed = get_args(tp)
        if value not in allowed:
            raise LoralabError(
                f"Bad value {value!r} for '{key}': allowed values are {', '.join(map(str, allowed))}."
            )
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        # Try the more specific types first so "16" stays an int, not a str.
        for arg in sorted((a for a in args if a is not type(None)), key=_specificity):
            try:
                return coerce(value, arg, key)
            except LoralabError as e:
                errors.append(str(e))
        names = " or ".join(_type_name(a) for a in args)
        raise LoralabError(f"Bad value {value!r} for '{key}': expected {names}.")
    if origin is list:
        (item,) = get_args(tp) or (Any,)
        if isinstance(value, str):
            if "," not in value:  # "standard" stays a string where a str is also allowed
                raise LoralabError(f"Bad value {value!r} for '{key}': expected a list.")
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise LoralabError(f"Bad value {value!r} for '{key}': expected a list.")
        return [coerce(v, item, key) for v in value]
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise LoralabError(f"Bad value {value!r} for '{key}': expected a mapping.")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise LoralabError(f"Bad value {value!r} for '{key}': expected true or false.")
    if tp is int:
        if isinstance(value, bool):
            raise LoralabError(f"Bad value {value!r} for '{key}': expected an integer.")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise LoralabError(f"Bad value {value!r} for '{key}': expected an integer.")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise LoralabError(f"Bad value {value!r} for '{key}': expected a number.")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise LoralabError(f"Bad value {value!r} for '{key}': expected a string.")
    return value


def _specificity(tp: Any) -> int:
    order = {bool: 0, int: 1, float: 2}
    if get_origin(tp) is Literal:
        return -1
    if get_origin(tp) is list:
        return 4
    return order.get(tp, 5)


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "null"
    if get_origin(tp) is list:
        return "a list"
    if get_origin(tp) is Literal:
        return "/".join(map(str, get_args(tp)))
    return getattr(tp, "__name__", str(tp))
