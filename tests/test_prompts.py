"""The one prompt-list reader of encode-prompts and train-grpo: the reference CSV as spreadsheets save it (BOM,
CRLF, spaced header names, extra columns, quoted commas and line breaks), the text form, and errors that name the
file and the line."""

import pytest
import torch

from idgrpo.prompts import PromptRow, read_prompts

REFERENCE_CSV = 'ref_paths,prompt\nrefs/a.png;refs/b.png,"two people, talking"\n,a dog\n'


def _write(path, text, encoding="utf-8"):
    path.write_bytes(text.encode(encoding))
    return path


def _refs(tmp_path):
    (tmp_path / "refs").mkdir(exist_ok=True)
    for name in ("a.png", "b.png"):
        (tmp_path / "refs" / name).write_bytes(b"not decoded unless loaded")


def test_reference_format(tmp_path):
    rows = read_prompts(_write(tmp_path / "data.csv", REFERENCE_CSV))
    assert [r.prompt for r in rows] == ["two people, talking", "a dog"]
    assert rows[0].ref_paths == [tmp_path / "refs" / "a.png", tmp_path / "refs" / "b.png"]  # against the CSV's folder
    assert rows[1].ref_paths == [] and rows[0].references == []  # images are read only on request
    assert [r.where for r in rows] == [f"{tmp_path / 'data.csv'} line 2", f"{tmp_path / 'data.csv'} line 3"]


def test_spreadsheet_exports_read_the_same(tmp_path):
    """Excel's "CSV UTF-8" (byte-order mark, CRLF), spaces around header names, other column orders and unknown
    extra columns give the rows of the plain file; an absolute reference path is kept."""
    plain = read_prompts(_write(tmp_path / "plain.csv", REFERENCE_CSV))
    variants = {
        "bom_crlf.csv": "\ufeff" + REFERENCE_CSV.replace("\n", "\r\n"),
        "spaced.csv": REFERENCE_CSV.replace("ref_paths,prompt", " ref_paths , prompt "),
        "reordered.csv": 'id,prompt,ref_paths\n7,"two people, talking",refs/a.png;refs/b.png\n8,a dog,\n',
        "blank_rows.csv": REFERENCE_CSV.replace("\n,a dog", "\n,\n\n,a dog") + ",\n",
    }
    for name, text in variants.items():
        rows = read_prompts(_write(tmp_path / name, text))
        assert [(r.prompt, r.ref_paths) for r in rows] == [(r.prompt, r.ref_paths) for r in plain], name
    absolute = tmp_path / "elsewhere" / "c.png"
    (row,) = read_prompts(_write(tmp_path / "abs.csv", f"ref_paths,prompt\n {absolute} ;refs/a.png,hi\n"))
    assert row.ref_paths == [absolute, tmp_path / "refs" / "a.png"]


def test_line_numbers_follow_quoted_line_breaks(tmp_path):
    path = _write(tmp_path / "multi.csv", 'prompt,ref_paths\n"first line\nsecond line",a.png\nnext\n"",a.png\n')
    with pytest.raises(ValueError, match=r"multi.csv line 5: empty prompt"):
        read_prompts(path)
    rows = read_prompts(_write(path, 'prompt\n"first line\nsecond line"\nnext\n'))
    assert rows[0].prompt == "first line\nsecond line" and rows[1].where.endswith("multi.csv line 4")


def test_text_file_one_prompt_per_line(tmp_path):
    rows = read_prompts(_write(tmp_path / "p.txt", "\ufeffa cat\r\n\r\n  two people, talking  \r\n"))
    assert [(r.prompt, r.ref_paths, r.where.rsplit(" ", 1)[1]) for r in rows] == [
        ("a cat", [], "1"), ("two people, talking", [], "3")]  # fmt: skip


@pytest.mark.parametrize("name, text, encoding, error, message", [
    ("latin1.csv", "ref_paths,prompt\n,ok\n,caf\u00e9\n", "latin-1", ValueError,
     r"latin1.csv line 3: not UTF-8 text \(byte 0xe9\)"),
    ("latin1.txt", "ok\ncaf\u00e9\n", "latin-1", ValueError, r"latin1.txt line 2: not UTF-8"),
    ("wide.csv", "ref_paths,prompt\na.png,two people, talking\n", "utf-8", ValueError,
     r"wide.csv line 2: 3 fields, but the header has 2 \(ref_paths,prompt\); put a prompt that contains commas"),
    ("no_prompt.csv", "ref_paths,caption\na.png,hello\n", "utf-8", ValueError,
     r"no_prompt.csv line 1: CSV has no 'prompt' column.*caption"),
    ("twice.csv", "prompt, prompt\na,b\n", "utf-8", ValueError, r"twice.csv line 1: column\(s\) \['prompt'\]"),
    ("empty_prompt.csv", "prompt,ref_paths\nhello\n  ,a.png\n", "utf-8", ValueError,
     r"empty_prompt.csv line 3: empty prompt"),
    ("short_row.csv", "ref_paths,prompt\nhello\n", "utf-8", ValueError, r"short_row.csv line 2: empty prompt"),
    ("header_only.csv", "ref_paths,prompt\r\n", "utf-8", ValueError, r"header_only.csv: no prompts"),
    ("empty.csv", "", "utf-8", ValueError, r"empty.csv: empty CSV"),
    ("blank.txt", "\n \n", "utf-8", ValueError, r"blank.txt: no prompts"),
])  # fmt: skip
def test_bad_files_name_the_file_and_line(tmp_path, name, text, encoding, error, message):
    with pytest.raises(error, match=message):
        read_prompts(_write(tmp_path / name, text, encoding))


def test_references_checked_or_loaded_on_request(tmp_path):
    _refs(tmp_path)
    path = _write(tmp_path / "data.csv", REFERENCE_CSV + "refs/a.png;refs/missing.png,three\n")
    assert len(read_prompts(path)) == 3  # paths only: nothing is opened
    with pytest.raises(FileNotFoundError, match=r"data.csv line 4: reference image .*missing.png not found"):
        read_prompts(path, references="check")
    with pytest.raises(FileNotFoundError, match="absent.csv: prompt file not found"):
        read_prompts(tmp_path / "absent.csv")
    with pytest.raises(ValueError, match="references='all'"):
        read_prompts(path, references="all")
    pytest.importorskip("av")
    from idgrpo.media import write_image

    image = torch.randint(0, 256, (8, 6, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    write_image(tmp_path / "refs" / "a.png", image)
    (row,) = read_prompts(_write(tmp_path / "one.csv", "ref_paths,prompt\nrefs/a.png,one\n"), references="load")
    assert torch.equal(row.references[0], image)
    with pytest.raises(ValueError, match=r"data.csv line 2: .*b.png"):  # b.png is not an image
        read_prompts(_write(path, REFERENCE_CSV), references="load")


def test_every_command_reads_with_this_reader():
    from idgrpo import rl
    from idgrpo.models import prompt_cache
    from idgrpo.rl import recipe, trainer

    assert prompt_cache.read_prompts is recipe.read_prompts is rl.read_prompts is read_prompts
    assert prompt_cache.PromptRow is trainer.PromptRow is rl.PromptRow is PromptRow
