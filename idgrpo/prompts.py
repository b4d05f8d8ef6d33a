"""The prompt list every command reads (`encode-prompts`, `train-grpo`): the reference CSV or a text file.

    rows = read_prompts("data/train.csv")                        # prompts + resolved reference paths
    rows = read_prompts("data/train.csv", references="check")    # ... and every reference image must exist
    rows = read_prompts("data/train.csv", references="load")     # ... read as uint8 (H, W, 3) tensors
    rows = read_prompts("prompts.txt")                           # one prompt per line, no references

The CSV format (docs/data-and-checkpoints.md): a header naming a `prompt` column and optionally a
`ref_paths` column (reference image paths separated by `;`, relative ones resolved against the CSV's
folder); other columns are ignored. UTF-8 with or without a byte-order mark, LF or CRLF line ends,
spaces around the header names. Any other suffix than `.csv` is read as text, one prompt per line
(blank lines skipped).

Every error names the file and the line: a bad encoding, a row with more fields than the header, an
empty prompt, a missing or unreadable reference image (when references are checked or loaded).
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from pathlib import Path

import torch

REFERENCE_MODES = ("paths", "check", "load")


@dataclass
class PromptRow:
    """One row of a prompt list (in training, one row is one GRPO group)."""

    prompt: str
    references: list[torch.Tensor] = field(default_factory=list)
    """uint8 (H, W, 3) reference images; filled by `read_prompts(..., references="load")`."""
    ref_paths: list[Path] = field(default_factory=list)
    """Reference image paths, relative ones already resolved against the CSV's folder."""
    where: str = ""
    """File and line, for error messages."""


def read_prompts(path: str | Path, *, references: str = "paths") -> list[PromptRow]:
    """The rows of a prompt CSV (or text file), in file order.

    `references`: "paths" resolves the reference paths only; "check" also requires every reference image
    to exist; "load" reads them into `PromptRow.references`."""
    if references not in REFERENCE_MODES:
        raise ValueError(f"references={references!r}: expected one of {REFERENCE_MODES}")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: prompt file not found")
    text = _read_text(path)
    rows = _csv_rows(path, text) if path.suffix.lower() == ".csv" else [
        PromptRow(line.strip(), where=f"{path} line {number}")
        for number, line in enumerate(text.split("\n"), start=1) if line.strip()]  # fmt: skip
    if not rows:
        raise ValueError(f"{path}: no prompts")
    if references != "paths":
        for row in rows:
            _check_references(row, load=references == "load")
    return rows


def _read_text(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")  # a spreadsheet's "CSV UTF-8" starts with a byte-order mark
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise ValueError(f"{path} line {line}: not UTF-8 text (byte 0x{data[e.start]:02x}); save the file as "
                         "UTF-8") from e


def _csv_rows(path: Path, text: str) -> list[PromptRow]:
    reader = csv.reader(io.StringIO(text, newline=""))
    rows: list[PromptRow] = []
    header: list[str] | None = None
    line = 1  # first line of the record being read: a quoted field may span several lines
    try:
        for record in reader:
            where, line = f"{path} line {line}", reader.line_num + 1
            if not any(field.strip() for field in record):  # blank line, or a spreadsheet's empty row
                continue
            if header is None:
                header = [name.strip() for name in record]
                if "prompt" not in header:
                    raise ValueError(f"{where}: CSV has no 'prompt' column (columns: {header}); expected a header "
                                     "like 'ref_paths,prompt'")
                duplicated = sorted({name for name in header if name and header.count(name) > 1})
                if duplicated:
                    raise ValueError(f"{where}: column(s) {duplicated} appear more than once in the header")
                prompt_at = header.index("prompt")
                refs_at = header.index("ref_paths") if "ref_paths" in header else None
                continue
            if len(record) > len(header):
                raise ValueError(f"{where}: {len(record)} fields, but the header has {len(header)} "
                                 f"({','.join(header)}); put a prompt that contains commas in double quotes")
            prompt = record[prompt_at].strip() if prompt_at < len(record) else ""
            if not prompt:
                raise ValueError(f"{where}: empty prompt")
            refs = record[refs_at] if refs_at is not None and refs_at < len(record) else ""
            ref_paths = [path.parent / p.strip() for p in refs.split(";") if p.strip()]  # absolute paths stay
            rows.append(PromptRow(prompt, ref_paths=ref_paths, where=where))
    except csv.Error as e:
        raise ValueError(f"{path} line {reader.line_num}: malformed CSV ({e})") from e
    if header is None:
        raise ValueError(f"{path}: empty CSV; expected a header like 'ref_paths,prompt'")
    return rows


def _check_references(row: PromptRow, *, load: bool) -> None:
    from idgrpo.media import read_image

    for ref in row.ref_paths:
        if not ref.is_file():
            raise FileNotFoundError(f"{row.where}: reference image {ref} not found (column `ref_paths`)")
        if load:
            try:
                row.references.append(read_image(ref))
            except ValueError as e:
                raise ValueError(f"{row.where}: {e}") from e


__all__ = ["PromptRow", "read_prompts"]
