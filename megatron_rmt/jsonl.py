"""JSON Lines input whose errors name the file and line, for every reader of the project's
JSONL files (math problems, held-out documents, evaluation sets)."""

import json
from collections.abc import Iterator

from megatron_rmt.config import UserError


class InputError(UserError, ValueError):
    """A bad input file; the message starts with `FILE[:LINE]:` and says what was expected."""


def records(path: str) -> Iterator[tuple[int, dict]]:
    """(line number, object) for every non-blank line of `path`."""
    try:
        fh = open(path, encoding="utf-8")
    except OSError as e:
        raise InputError(f"{path}: cannot read ({e.strerror})") from None
    with fh:
        for number, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"{path}:{number}: not valid JSON ({e.msg})") from None
            if not isinstance(record, dict):
                raise InputError(f"{path}:{number}: expected a JSON object")
            yield number, record
