"""What the `mhee` command prints: plain tables, JSON, and one-line errors and warnings.

It imports the standard library and `mhee_sdk.validation` only (the SDK's other error types are looked
up once their modules are loaded), so `mhee --help` stays instant.
"""

from __future__ import annotations

import json
import math
import numbers
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from mhee_sdk.validation import ConfigError


# --------------------------------------------------------------------------- output
def format_table(rows: Sequence[dict[str, object]], columns: Sequence[str]) -> str:
    """Plain-text table with a header row, columns padded to their widest cell."""
    cells = [[str(row.get(column, "")) for column in columns] for row in rows]
    widths = [max([len(column), *(len(r[i]) for r in cells)]) for i, column in enumerate(columns)]
    lines = ["  ".join(column.ljust(w) for column, w in zip(columns, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(line.rstrip() for line in lines)


def print_json(payload: object) -> None:
    """JSON on stdout; NaN and infinities become null (JSON has no such numbers)."""
    print(json.dumps(plain(payload), indent=2, default=str))


def plain(value: object) -> object:
    """`value` with numpy numbers, paths and non-finite floats made JSON-ready (NaN -> None)."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if type(value).__name__ in {"bool", "bool_"}:
        return bool(value)
    if isinstance(value, numbers.Integral):  # numpy integers too
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value) if math.isfinite(value) else None
    return value


def table_records(table) -> list[dict[str, object]]:
    """A DataFrame's rows as JSON-ready dicts."""
    return [plain(row) for row in table.to_dict(orient="records")]


# --------------------------------------------------------------------------- errors
class UserError(Exception):
    """A mistake the user can fix; the message says how."""


def _loaded(module: str, name: str) -> type | None:
    """An exception class from `module` if that module was imported (an error from it implies it was)."""
    found = sys.modules.get(module)
    return getattr(found, name, None) if found is not None else None


def _raised_in_sdk(err: BaseException) -> bool:
    """True when the innermost frame of the traceback is mhee_sdk's code (a deliberate, worded raise)."""
    tb = err.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    return str(tb.tb_frame.f_globals.get("__name__", "")).startswith("mhee_sdk")


def one_line(text: str) -> str:
    """`text` on one line (inner line breaks become spaces)."""
    return re.sub(r"\s*\n\s*", " ", str(text).strip())


def describe_error(err: Exception) -> tuple[str, bool]:
    """The one-line message for `err` and whether it is a user error (else a bug: the traceback helps)."""
    user_types = tuple(
        cls for cls in (
            UserError, ConfigError, _loaded("mhee_sdk.registry", "PluginError"),
            _loaded("mhee_sdk.store", "StoreError"), _loaded("mhee_sdk.assets", "AssetMissingError"),
        ) if cls is not None
    )  # fmt: skip
    if isinstance(err, user_types):
        return one_line(err), True
    if isinstance(err, OSError) and err.filename is not None:
        return one_line(f"{err.strerror or err}: {err.filename}; check the path and its permissions"), True
    if type(err).__module__.split(".")[0] in {"duckdb", "_duckdb"}:  # the store file itself is unusable
        return one_line(f"the store could not be used ({type(err).__name__}: {err}); check --store"), True
    if isinstance(err, ValueError | TypeError | OSError) and _raised_in_sdk(err):
        return one_line(err), True
    return one_line(f"internal error ({type(err).__name__}: {err}); run with --debug for the traceback"), False


def show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """``warnings.showwarning`` replacement: one line per warning on stderr."""
    print(f"Warning: {one_line(message)}", file=sys.stderr)
