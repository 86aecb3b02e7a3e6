"""Reading manifest files into plain data that remembers its line numbers.

YAML and JSON become dicts whose `line` attribute is where they start; JSON Lines
and CSV rows carry their line too. Nothing here knows what a job is.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from ..errors import Problem

MANIFEST_SUFFIXES = frozenset({".yaml", ".yml", ".json", ".jsonl", ".csv"})


class LineDict(dict[str, Any]):
    """A mapping that knows the line (1-based) it starts on."""

    line: int | None = None


# libyaml's parser when PyYAML has it (its wheels do): several times faster, same node marks.
_BaseLoader: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _Loader(_BaseLoader):  # type: ignore[valid-type,misc]
    """A safe loader that keeps lines, refuses duplicate keys, and reads 1e-6 as a float."""

    problems: list[Problem]
    path: str


def _construct_mapping(loader: _Loader, node: yaml.MappingNode) -> LineDict:
    loader.flatten_mapping(node)
    out = LineDict()
    out.line = node.start_mark.line + 1
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        if key in out:
            loader.problems.append(
                Problem(
                    loader.path,
                    key_node.start_mark.line + 1,
                    None,
                    f"key {key!r} appears twice in one mapping",
                )
            )
        out[key] = loader.construct_object(value_node, deep=True)
    return out


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)
# YAML 1.1 reads "1e-6" as text; the JSON and YAML 1.2 reading is a number.
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def read_text(path: Path, problems: list[Problem], what: str = "file") -> str | None:
    """The file as UTF-8 text, or None with a problem naming the file, and the line and
    column of the first byte that is not UTF-8 (a spreadsheet's export is often Latin-1)."""
    if path.is_dir():
        inside = sorted(p.name for p in path.glob("*") if p.suffix.lower() in MANIFEST_SUFFIXES)[:5]
        hint = f" (it holds {', '.join(inside)})" if inside else ""
        problems.append(Problem(str(path), None, None, f"is a folder, not a {what}: name the file itself{hint}"))
        return None
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        problems.append(Problem(str(path), None, None, "no such file"))
        return None
    except OSError as exc:
        problems.append(Problem(str(path), None, None, f"cannot read this {what}: {exc.strerror}"))
        return None
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        problems.append(
            Problem(
                str(path),
                None,
                None,
                'is UTF-16 text (a spreadsheet\'s "Unicode text"); save it as UTF-8 ("CSV UTF-8", or '
                "`iconv -f utf-16 -t utf-8`) and run again",
            )
        )
        return None
    try:
        # A spreadsheet's "CSV UTF-8" starts with a byte-order mark: not part of the first column's name.
        return data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        problems.append(
            Problem(
                str(path),
                line,
                None,
                f"not UTF-8 text: byte 0x{data[exc.start]:02x} at column {column}; "
                "save the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8`) and run again",
            )
        )
        return None


def load_document(path: Path, problems: list[Problem]) -> Any:
    """A YAML or JSON file as data with LineDicts; syntax errors become problems."""
    text = read_text(path, problems, "manifest")
    if text is None:
        return None
    if path.suffix.lower() == ".json":
        try:
            json.loads(text)  # JSON's own verdict on syntax, with its line
        except json.JSONDecodeError as exc:
            problems.append(Problem(str(path), exc.lineno, None, f"invalid JSON: {exc.msg} (column {exc.colno})"))
            return None
    loader = _Loader(text)
    loader.problems, loader.path = problems, str(path)
    try:
        return loader.get_single_data()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        line = mark.line + 1 if mark else None
        problems.append(Problem(str(path), line, None, f"invalid YAML: {exc.problem or exc}"))
        return None
    finally:
        loader.dispose()


def iter_json_lines(path: Path, problems: list[Problem]) -> Iterator[LineDict]:
    text = read_text(path, problems)
    if text is None:
        return
    with io.StringIO(text) as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                problems.append(Problem(str(path), number, None, f"invalid JSON: {exc.msg} (column {exc.colno})"))
                continue
            if not isinstance(obj, dict):
                problems.append(Problem(str(path), number, None, "each line must be a JSON object"))
                continue
            row = LineDict(obj)
            row.line = number
            yield row


def iter_csv_rows(path: Path, problems: list[Problem]) -> Iterator[LineDict]:
    text = read_text(path, problems, "CSV file")
    if text is None:
        return
    # A spreadsheet set to a European locale separates cells with ";" (or saves tabs): read its
    # header's separator when that header holds no comma.
    header = text.partition("\n")[0]
    delimiter = next((d for d in (";", "\t") if d in header and "," not in header), ",")
    with io.StringIO(text, newline="") as fh:
        reader = csv.DictReader(fh, delimiter=delimiter)
        if not reader.fieldnames:
            problems.append(Problem(str(path), 1, None, "the CSV file has no header row"))
            return
        for raw in reader:
            row = LineDict({k.strip(): (v or "").strip() for k, v in raw.items() if k is not None})
            row.line = reader.line_num
            if None in raw:
                problems.append(Problem(str(path), reader.line_num, None, "this row has more cells than the header"))
            yield row
