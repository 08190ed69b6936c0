"""The data layer against generated broken inputs: each works, or fails before it can train naming its dataset, row and
column, or with ``skip_bad_rows`` is left out and counted.

Every input below is generated here (PIL, or bytes by hand), put in row 1 of a small training table (``query``,
``image`` as paths under a root directory, ``negative_0``) and read by ``TrainRows`` and the embedding collator. Every
failure is a ``DataError`` naming the dataset, the row (of the user's table) and the column. "Dropped, listed": left
out at construction and listed in ``TrainRows.dropped``; "passed over, counted": the next row takes its place when
loaded, counted in ``TrainExample.skipped`` (the ``data/skipped_rows`` metric).

| input                                          | without `skip_bad_rows`                   | with `skip_bad_rows` |
|------------------------------------------------|-------------------------------------------|----------------------|
| valid PNG                                      | works                                     | works                |
| truncated PNG (a valid file cut at half)       | fails at setup: "corrupt image"           | dropped, listed      |
| truncated JPEG (a valid file cut at half)      | fails when its row loads: "cannot decode" | passed over, counted |
| truncated JPEG as a hard negative              | fails when its row loads                  | passed over, counted |
| zero-byte file                                 | fails at setup: "the file is empty"       | dropped, listed      |
| 1x1 PNG                                        | works (resized up to `min_pixels`)        | works                |
| PNG header claiming 20000x20000, no pixels     | fails at setup: "larger than a page"      | dropped, listed      |
| PNG header claiming 10000x10000 (PIL warns)    | fails at setup: "larger than a page"      | dropped, listed      |
| 2010x10 page (aspect ratio beyond 200:1)       | fails at setup: "aspect ratios beyond"    | dropped, listed      |
| CMYK JPEG                                      | works (RGB, as HF `load_image`)           | works                |
| 16-bit greyscale PNG, values above 255         | works (scaled to 8 bits, not clipped)     | works                |
| palette PNG                                    | works                                     | works                |
| palette PNG with a transparent index           | works (transparent pixels white)          | works                |
| EXIF-rotated JPEG (40x20, Orientation 6)       | works: 20x40, as HF `load_image`          | works                |
| JPEG with a corrupt EXIF block                 | works (stored orientation; PIL warns)     | works                |
| missing file                                   | fails at setup: "No such file"            | dropped, listed      |
| a directory's path                             | fails at setup: "Is a directory"          | dropped, listed      |
| a text file's path                             | fails at setup: "not an image"            | dropped, listed      |
| empty path                                     | fails at setup: "the value is empty"      | dropped, listed      |
| null image                                     | fails at setup: "the value is empty"      | dropped, listed      |
| null hard negative                             | fails at setup: "the value is empty"      | dropped, listed      |
| empty query                                    | fails at setup: "empty text"              | dropped, listed      |
| whitespace query                               | fails at setup: "empty text"              | dropped, listed      |
| zero-width-space query ("\\u200b\\u200b")      | fails at setup: "only invisible"          | dropped, listed      |
| null query                                     | fails at setup: "expected text"           | dropped, listed      |
| 10,000-word query                              | works (collator cuts to `max_text_tokens`)| works                |
| CJK, emoji, RTL Arabic, combining marks, ZWJ emoji, NUL queries | works (NFC round trip)   | works                |
| query column of ints / floats / lists          | fails at setup, column named              | fails (bad column)   |
| image column of ints / lists; negative of ints | fails at setup, column named              | fails (bad column)   |
| fewer negative columns than asked; no query    | fails at setup, columns listed            | fails (bad column)   |
| every row bad                                  | fails at setup, first row named           | fails: nothing left  |
| bad eval corpus page; invisible eval query     | fails at setup, `corpus`/`queries` row    | eval never skips     |

Decision: a query of only invisible characters (zero-width spaces, joiners, direction marks, NUL) is refused as
empty: ``str.strip`` keeps them, yet the model would read a few tokens that say nothing. The same characters inside
a query with visible text are kept. Lone surrogates cannot occur (Arrow's utf8 refuses them), so none is tried.
"""

from __future__ import annotations

import re
import struct
import unicodedata
import warnings
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image
from transformers.image_utils import load_image

from tests.conftest import TINY_PIXELS
from vdr.data.collator import EmbeddingCollator
from vdr.data.errors import DataError
from vdr.data.images import EncodedImage, decode
from vdr.data.schema import EvalSet, PairRows, TrainExample, TrainRows
from vdr.models.prompts import messages

ROWS = 3  # row 1 holds the case; rows 0 and 2 are good
TOKENS_PER_PAGE = TINY_PIXELS // (32 * 32)  # min_pixels of the tiny processor: at least 4 visual tokens a page


def _noise(size: tuple[int, int], seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels)  # incompressible: cutting the file at half cuts the pixel data


def _save(root: Path, name: str, image: Image.Image, format: str = "PNG", **options) -> str:
    (root / "pages").mkdir(exist_ok=True)
    image.save(root / "pages" / name, format=format, **options)
    return f"pages/{name}"


def _write(root: Path, name: str, data: bytes) -> str:
    (root / "pages").mkdir(exist_ok=True)
    (root / "pages" / name).write_bytes(data)
    return f"pages/{name}"


def _truncated(root: Path, name: str, format: str) -> str:
    whole = root / "pages" / name
    _save(root, name, _noise((64, 64)), format)
    data = whole.read_bytes()
    return _write(root, name, data[: len(data) // 2])


def _png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` RGB pixels, with a few bytes of pixel data and no end: nothing
    of that size is ever allocated."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8 bits, RGB, no interlace
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 64))


def _halves(size: tuple[int, int] = (40, 20)) -> Image.Image:
    """Left half red, right half blue: a rotation shows where the left edge went."""
    image = Image.new("RGB", size, (255, 0, 0))
    image.paste((0, 0, 255), (size[0] // 2, 0, size[0], size[1]))
    return image


def _exif(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation  # Orientation
    return exif.tobytes()


def _palette(transparent: bool) -> Callable[[Path], str]:
    def make(root: Path) -> str:
        image = Image.new("P", (16, 8), 0)
        image.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)  # index 0 red, 1 blue
        image.paste(1, (8, 0, 16, 8))
        options = {"transparency": 1} if transparent else {}
        return _save(root, f"palette_{transparent}.png", image, **options)

    return make


def _sixteen_bit(root: Path) -> str:
    image = Image.fromarray(np.full((10, 12), 40000, dtype=np.uint16))
    assert image.mode == "I;16"
    return _save(root, "sixteen.png", image)


def _not_an_image(root: Path) -> str:
    return _write(root, "notes.txt", b"hello, this is not a page\n")


def _directory(root: Path) -> str:
    (root / "pages" / "a_directory").mkdir(parents=True)
    return "pages/a_directory"


def _page_is(size: tuple[int, int], pixels: dict[tuple[int, int], tuple[int, int, int]] | None = None,
              tolerance: int = 0) -> Callable[[TrainExample, object], None]:
    """The decoded positive is RGB, of ``size``, with these pixel values (within ``tolerance``: JPEG is lossy)."""

    def check(example: TrainExample, value) -> None:
        page = example.pages[0]
        assert (page.mode, page.size) == ("RGB", size)
        for xy, rgb in (pixels or {}).items():
            assert np.abs(np.subtract(page.getpixel(xy), rgb)).max() <= tolerance, (xy, page.getpixel(xy))

    return check


def _query_kept(example: TrainExample, value) -> None:
    assert example.query == value  # the dataset keeps the text; the collator shortens it


LONG_QUERY = " ".join(f"word{i % 97}" for i in range(10_000))
UNICODE_QUERIES = {
    "cjk": "2019年の東京の売上高はいくらですか",
    "emoji": "revenue 📈 growth 🚀 in 2021",
    "rtl-arabic": "ما هي إيرادات الشركة في عام ٢٠١٩؟",
    "combining-marks": "cafe\u0301 nai\u0308ve re\u0301sume\u0301",  # decomposed: the tokenizer composes them (NFC)
    "zwj-emoji": "team 👩\u200d💻👨\u200d👩\u200d👧 report",
    "nul": "acme\x00revenue 2019",
}


@dataclass
class Case:
    """One generated input, put in ``column`` of row 1, and what it must do."""

    name: str
    column: str
    make: Callable[[Path], object]  # writes what it needs under the root; the value for the table
    outcome: str  # "works"; "setup": fails at construction; "load": fails when the row is loaded
    match: str = ""  # a regex the failure's message matches
    check: Callable[[TrainExample, object], None] | None = None  # what a working row decodes to


CASES = [
    Case("valid-png", "image", lambda root: _save(root, "valid.png", _halves()), "works",
         check=_page_is((40, 20), {(0, 0): (255, 0, 0), (39, 0): (0, 0, 255)})),
    Case("truncated-png", "image", lambda root: _truncated(root, "cut.png", "PNG"), "setup", "corrupt image"),
    Case("truncated-jpeg", "image", lambda root: _truncated(root, "cut.jpg", "JPEG"), "load",
         "cannot decode image .*truncated"),
    Case("truncated-jpeg-negative", "negative_0", lambda root: _truncated(root, "cut_negative.jpg", "JPEG"), "load",
         "cannot decode image"),
    Case("zero-byte", "image", lambda root: _write(root, "empty.png", b""), "setup", r"the file is empty \(0 bytes\)"),
    Case("1x1", "image", lambda root: _save(root, "dot.png", Image.new("RGB", (1, 1), (9, 99, 199))), "works",
         check=_page_is((1, 1), {(0, 0): (9, 99, 199)})),
    Case("header-20000x20000", "image", lambda root: _write(root, "bomb.png", _png_header(20000, 20000)), "setup",
         "larger than a page can be"),
    Case("header-10000x10000", "image", lambda root: _write(root, "big.png", _png_header(10000, 10000)), "setup",
         "larger than a page can be"),
    Case("aspect-ratio-201", "image", lambda root: _save(root, "strip.png", Image.new("RGB", (2010, 10))), "setup",
         "aspect ratios beyond 200:1"),
    Case("cmyk-jpeg", "image", lambda root: _save(root, "cmyk.jpg", _halves().convert("CMYK"), "JPEG", quality=95),
         "works", check=_page_is((40, 20), {(2, 10): (255, 0, 0), (37, 10): (0, 0, 255)}, tolerance=40)),
    Case("16-bit-grey", "image", _sixteen_bit, "works", check=_page_is((12, 10), {(0, 0): (156, 156, 156)})),
    Case("palette", "image", _palette(transparent=False), "works",
         check=_page_is((16, 8), {(0, 0): (255, 0, 0), (15, 0): (0, 0, 255)})),
    Case("palette-transparent", "image", _palette(transparent=True), "works",
         check=_page_is((16, 8), {(0, 0): (255, 0, 0), (15, 0): (255, 255, 255)})),
    Case("exif-rotated-jpeg", "image",
         lambda root: _save(root, "rotated.jpg", _halves(), "JPEG", quality=95, exif=_exif(6)), "works",
         check=_page_is((20, 40), {(10, 2): (255, 0, 0), (10, 37): (0, 0, 255)}, tolerance=40)),
    Case("corrupt-exif-jpeg", "image",
         lambda root: _save(root, "bad_exif.jpg", _halves(), "JPEG", exif=b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\x00"),
         "works", check=_page_is((40, 20))),
    Case("missing-file", "image", lambda root: "pages/nowhere.png", "setup",
         r"cannot read image file .*nowhere.png.*No such file or directory"),
    Case("directory", "image", _directory, "setup", "cannot read image file .*a_directory.*Is a directory"),
    Case("text-file", "image", _not_an_image, "setup", r"not an image in a format PIL reads: the file starts with"),
    Case("empty-path", "image", lambda root: "", "setup", "no positive page: the value is empty"),
    Case("null-image", "image", lambda root: None, "setup", "no positive page: the value is empty"),
    Case("null-negative", "negative_0", lambda root: None, "setup", "hard-negative column: the value is empty"),
    Case("empty-query", "query", lambda root: "", "setup", "empty text"),
    Case("whitespace-query", "query", lambda root: " \t\n ", "setup", "empty text"),
    Case("zero-width-query", "query", lambda root: "\u200b\u200b", "setup", "only invisible characters"),
    Case("null-query", "query", lambda root: None, "setup", "expected text, got NoneType"),
    Case("10000-word-query", "query", lambda root: LONG_QUERY, "works", check=_query_kept),
    *(Case(f"unicode-{kind}-query", "query", lambda root, text=text: text, "works", check=_query_kept)
      for kind, text in UNICODE_QUERIES.items()),
]
# Caught by the header check; without it they fail when their row loads (a truncated PNG with another message).
HEADER_CASES = ["truncated-png", "zero-byte", "header-20000x20000", "header-10000x10000", "aspect-ratio-201",
                "missing-file", "directory", "text-file"]
LOAD_MATCH = {"truncated-png": "cannot decode image .*truncated"}


def _good_columns(root: Path, rows: int) -> dict[str, list]:
    colors = [(200, 30 * i % 256, 90) for i in range(rows)]
    return {"query": [f"acme revenue {2000 + i}" for i in range(rows)],
            "image": [_save(root, f"good_{i}.png", Image.new("RGB", (48, 32), colors[i])) for i in range(rows)],
            "negative_0": [_save(root, "negative.png", Image.new("RGB", (32, 48), (20, 20, 20)))] * rows}


def _table(root: Path, cases: list[Case], first_row: int = 1, rows: int = ROWS) -> datasets.Dataset:
    """Good rows, with case ``i``'s value in its column of row ``first_row + i``."""
    columns = _good_columns(root, rows)
    for i, case in enumerate(cases):
        columns[case.column][first_row + i] = case.make(root)
    features = datasets.Features({name: datasets.Value("string") for name in columns})
    return datasets.Dataset.from_dict(columns, features=features)


def _rows(table: datasets.Dataset, root: Path, **options) -> TrainRows:
    return TrainRows(table, "fuzz", num_negatives=1, root=str(root), **options)


def _quiet(call: Callable[[], object]):
    """Calls with warnings ignored (the corrupt EXIF block makes PIL warn; skipping warns by design)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return call()


@pytest.fixture(scope="module")
def collator(_tiny_backbone) -> EmbeddingCollator:
    return EmbeddingCollator(_tiny_backbone.processor, max_text_tokens=32)


def _assert_collates(collator: EmbeddingCollator, examples: list[TrainExample]) -> None:
    batch = collator(examples)
    assert len(batch) == len(examples) and batch.rows.tolist() == [e.row for e in examples]
    pages = [e.pages[c] for c in range(2) for e in examples]  # column-major, as the batch holds them
    reference = collator.image_processor(images=pages, return_tensors="pt")["image_grid_thw"]
    assert torch.equal(batch.documents.image_grid_thw, reference)
    assert (batch.documents.image_grid_thw.prod(-1) // collator.merge_area >= TOKENS_PER_PAGE).all()  # 1x1 included
    assert batch.queries.input_ids.shape[1] <= _template_tokens(collator) + collator.max_text_tokens


def _template_tokens(collator: EmbeddingCollator) -> int:
    """Tokens of the query template around an empty text."""
    rendered = collator.render(messages(collator.prompts.query, text=""))
    return len(collator.tokenizer(rendered, add_special_tokens=False)["input_ids"])


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_each_input_works_or_fails_naming_its_row_and_column(case: Case, tmp_path: Path, collator) -> None:
    table = _table(tmp_path, [case])
    where = rf"dataset 'fuzz', row 1, column '{case.column}': .*{case.match}"
    if case.outcome == "setup":
        with pytest.raises(DataError, match=where):
            _rows(table, tmp_path)
        return
    rows = _quiet(lambda: _rows(table, tmp_path))
    if case.outcome == "load":
        with pytest.raises(DataError, match=where):
            rows[1]
        return
    example = _quiet(lambda: rows[1])
    case.check(example, table[case.column][1])
    _assert_collates(collator, [rows[0], example, rows[2]])


@pytest.mark.parametrize("case", [c for c in CASES if c.outcome != "works"],
                         ids=[c.name for c in CASES if c.outcome != "works"])
def test_with_skip_bad_rows_a_bad_row_is_dropped_or_passed_over(case: Case, tmp_path: Path) -> None:
    table = _table(tmp_path, [case])
    if case.outcome == "setup":
        with pytest.warns(UserWarning, match=r"fuzz: 1 of 3 rows fail the checks and are left out"):
            rows = _rows(table, tmp_path, skip_bad_rows=True)
        assert list(rows.dropped) == [1] and re.search(case.match, rows.dropped[1])
        assert "row 1" in rows.bad_rows_report()
        assert [rows[i].row for i in range(len(rows))] == [0, 2]  # the user's rows, not positions
        return
    rows = _rows(table, tmp_path, skip_bad_rows=True)
    assert rows.dropped == {} and len(rows) == ROWS
    with pytest.warns(UserWarning, match=r"skipping a training row \(skip_bad_rows\).*row 1"):
        example = rows[1]
    assert (example.row, example.skipped) == (2, 1)  # the next row takes its place, counted


@pytest.mark.parametrize("name", HEADER_CASES)
def test_without_the_header_check_a_bad_file_fails_when_its_row_loads(name: str, tmp_path: Path) -> None:
    case = next(c for c in CASES if c.name == name)
    rows = _rows(_table(tmp_path, [case]), tmp_path, verify_images=False)
    with pytest.raises(DataError, match=rf"row 1, column 'image': .*{LOAD_MATCH.get(name, case.match)}"):
        rows[1]


def test_every_case_in_one_table_with_skip_bad_rows(tmp_path: Path, collator) -> None:
    """The whole zoo at once: exactly the rows that fail the checks are dropped, iterating yields only good rows, each
    row that does not decode is passed over and counted, and the good rows make batches."""
    table = _table(tmp_path, CASES, rows=len(CASES) + 1)  # row 0 good, case i in row i + 1
    rows = _quiet(lambda: _rows(table, tmp_path, skip_bad_rows=True))
    bad_at_setup = {i + 1 for i, c in enumerate(CASES) if c.outcome == "setup"}
    bad_at_load = {i + 1 for i, c in enumerate(CASES) if c.outcome == "load"}
    assert set(rows.dropped) == bad_at_setup
    assert f"{len(bad_at_setup)} of {len(table)} rows" in rows.bad_rows_report()
    examples = [_quiet(lambda i=i: rows[i]) for i in range(len(rows))]
    assert len(examples) == len(rows) == len(table) - len(bad_at_setup)  # batches keep their size
    assert {e.row for e in examples} == set(range(len(table))) - bad_at_setup - bad_at_load
    kept = [row for row in range(len(table)) if row not in bad_at_setup]
    for position, example in enumerate(examples):  # a row that does not decode: the next good one, counted
        offset = 0
        while kept[(position + offset) % len(kept)] in bad_at_load:
            offset += 1
        assert (example.row, example.skipped) == (kept[(position + offset) % len(kept)], offset)
    assert sum(e.skipped for e in examples) >= len(bad_at_load) > 0
    for start in range(0, len(examples), 8):
        _assert_collates(collator, examples[start : start + 8])


@pytest.mark.parametrize(("column", "values", "match"), [
    ("query", [1, 2, 3], r"column 'query': expected a text column, found feature Value\('int64'\)"),
    ("query", [0.5, 1.5, 2.5], r"column 'query': expected a text column"),
    ("query", [["a"], ["b"], ["c"]], r"column 'query': expected a text column"),
    ("image", [1, 2, 3], r"column 'image': expected an image column"),
    ("image", [["pages/good_0.png"]] * 3, r"column 'image': expected an image column"),
    ("negative_0", [7, 8, 9], r"column 'negative_0': expected an image column"),
], ids=["query-ints", "query-floats", "query-lists", "image-ints", "image-lists", "negative-ints"])
@pytest.mark.parametrize("skip", [False, True], ids=["fail", "skip_bad_rows"])
def test_a_column_of_the_wrong_type_fails_even_when_skipping(column, values, match, skip, tmp_path: Path) -> None:
    columns = _good_columns(tmp_path, ROWS)
    columns[column] = values
    with pytest.raises(DataError, match=rf"dataset 'fuzz', {match}"):
        _rows(datasets.Dataset.from_dict(columns), tmp_path, skip_bad_rows=skip)


@pytest.mark.parametrize("skip", [False, True], ids=["fail", "skip_bad_rows"])
def test_missing_columns_fail_even_when_skipping(skip: bool, tmp_path: Path) -> None:
    table = datasets.Dataset.from_dict(_good_columns(tmp_path, ROWS))
    with pytest.raises(DataError, match=r"asks for 2 hard negatives .* has 1: \['negative_0'\]"):
        TrainRows(table, "fuzz", num_negatives=2, root=str(tmp_path), skip_bad_rows=skip)
    with pytest.raises(DataError, match=r"missing column\(s\) \['query'\]"):
        _rows(table.remove_columns("query"), tmp_path, skip_bad_rows=skip)


def test_every_row_bad_fails_even_when_skipping(tmp_path: Path) -> None:
    table = _table(tmp_path, [next(c for c in CASES if c.name == "missing-file")] * ROWS, first_row=0)
    with pytest.raises(DataError, match=r"every one of its 3 rows fails the checks.*row 0, column 'image'"):
        _rows(table, tmp_path, skip_bad_rows=True)


def test_long_and_unicode_queries_collate_within_the_token_bound(collator) -> None:
    """A 10,000-word query (and 10,000 emoji, cut mid-character) keeps at most ``max_text_tokens`` text tokens and
    the template; unicode queries round-trip through the tokenizer, up to NFC (it composes combining marks)."""
    template = _template_tokens(collator)
    for query in (LONG_QUERY, "📈" * 10_000, "東京" * 5_000):
        inputs = collator.encode_texts([query, "short"], collator.prompts.query)
        assert inputs.input_ids.shape[1] == inputs.attention_mask[0].sum().item()  # the long one sets the width
        assert inputs.attention_mask[0].sum() <= template + collator.max_text_tokens
    texts = list(UNICODE_QUERIES.values())
    inputs = collator.encode_texts(texts, collator.prompts.query)
    tokenizer = collator.tokenizer
    for row, text in enumerate(texts):
        expected = unicodedata.normalize("NFC", text)
        assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == expected
        assert expected in tokenizer.decode(inputs.input_ids[row][inputs.attention_mask[row].bool()])


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_decodes_as_hf_load_image_shows_it(orientation: int, tmp_path: Path) -> None:
    path = tmp_path / _save(tmp_path, "page.jpg", _halves(), "JPEG", quality=95, exif=_exif(orientation))
    ours = decode(EncodedImage(path.read_bytes(), str(path)), dataset="d", row=0, column="image")
    assert np.array_equal(np.asarray(ours), np.asarray(load_image(str(path))))
    assert ours.size == ((20, 40) if orientation >= 5 else (40, 20))  # 5-8 turn the page a quarter


def test_cmyk_decodes_as_hf_load_image(tmp_path: Path) -> None:
    path = tmp_path / _save(tmp_path, "cmyk.jpg", _noise((30, 20)).convert("CMYK"), "JPEG")
    ours = decode(EncodedImage(path.read_bytes(), str(path)), dataset="d", row=0, column="image")
    assert np.array_equal(np.asarray(ours), np.asarray(load_image(str(path))))


def test_pairs_and_teacher_scores_skip_bad_rows_and_keep_alignment(tmp_path: Path) -> None:
    columns = _good_columns(tmp_path, 4)
    pairs = datasets.Dataset.from_dict({**columns, "image": [*columns["image"][:2], "pages/nowhere.png",
                                                             columns["image"][3]], "label": [1.0, 1.5, 0.0, 0.25]})
    with pytest.raises(DataError, match=r"row 1, column 'label': expected a relevance label in \[0, 1\]"):
        PairRows(pairs, "fuzz", root=str(tmp_path))
    with pytest.warns(UserWarning, match="2 of 4 rows"):
        rows = PairRows(pairs, "fuzz", root=str(tmp_path), skip_bad_rows=True)
    assert list(rows.dropped) == [1, 2] and "column 'label'" in rows.dropped[1] and "nowhere" in rows.dropped[2]
    assert [(rows[i].row, rows[i].label) for i in range(len(rows))] == [(0, 1.0), (3, 0.25)]

    scored = datasets.Dataset.from_dict({**columns, "teacher": [[1.0, 0.5], [2.0, float("nan")], [0.1, 0.2], [3.0]]})
    with pytest.warns(UserWarning, match="2 of 4 rows"):
        rows = TrainRows(scored, "fuzz", num_negatives=1, root=str(tmp_path), teacher_column="teacher",
                         skip_bad_rows=True)
    assert list(rows.dropped) == [1, 3]
    assert [(rows[i].row, rows[i].teacher) for i in range(len(rows))] == [(0, [1.0, 0.5]), (2, [0.1, 0.2])]


def _eval_tables(root: Path, bad_page: str | None = None, bad_text: str | None = None):
    pages = _good_columns(root, ROWS)["image"]
    if bad_page is not None:
        pages[1] = bad_page
    queries = datasets.Dataset.from_dict({"id": ["q1", "q2"], "text": ["acme revenue", bad_text or "nexar debt"]})
    corpus = datasets.Dataset.from_dict({"id": ["p1", "p2", "p3"], "image": pages})
    qrels = datasets.Dataset.from_dict({"query_id": ["q1", "q2"], "corpus_id": ["p1", "p3"], "score": [1, 1]})
    return queries, corpus, qrels


@pytest.mark.parametrize("name", ["truncated-png", "missing-file", "header-20000x20000", "text-file"])
def test_a_bad_eval_page_fails_naming_the_corpus_row(name: str, tmp_path: Path) -> None:
    """Eval sets never skip: the corpus must be whole. Without the header check, the page fails when loaded."""
    case = next(c for c in CASES if c.name == name)
    tables = _eval_tables(tmp_path, bad_page=case.make(tmp_path))
    with pytest.raises(DataError, match=rf"dataset 'ev/corpus', row 1, column 'image': .*{case.match}"):
        EvalSet.from_tables("ev", *tables, root=str(tmp_path))
    corpus = EvalSet.from_tables("ev", *tables, root=str(tmp_path), verify_images=False).corpus_rows()
    with pytest.raises(DataError, match=r"dataset 'ev/corpus', row 1, column 'image'"):
        corpus[1]


def test_an_invisible_eval_query_fails_naming_its_row(tmp_path: Path) -> None:
    tables = _eval_tables(tmp_path, bad_text="\u200b\u2060")
    with pytest.raises(DataError, match=r"dataset 'ev/queries', row 1, column 'text': empty text: only invisible"):
        EvalSet.from_tables("ev", *tables, root=str(tmp_path))


def test_the_table_above_names_every_case() -> None:
    """The docstring's table is what the README shows: it must not fall behind the cases."""
    table = __doc__.lower()
    labels = {"valid-png": "valid png", "truncated-png": "truncated png", "truncated-jpeg": "truncated jpeg",
              "truncated-jpeg-negative": "as a hard negative", "zero-byte": "zero-byte", "1x1": "1x1 png",
              "header-20000x20000": "20000x20000", "header-10000x10000": "10000x10000",
              "aspect-ratio-201": "2010x10", "cmyk-jpeg": "cmyk jpeg", "16-bit-grey": "16-bit greyscale",
              "palette": "palette png", "palette-transparent": "transparent index",
              "exif-rotated-jpeg": "exif-rotated", "corrupt-exif-jpeg": "corrupt exif", "missing-file": "missing file",
              "directory": "directory's path", "text-file": "text file's path", "empty-path": "empty path",
              "null-image": "null image", "null-negative": "null hard negative", "empty-query": "empty query",
              "whitespace-query": "whitespace query", "zero-width-query": "zero-width-space query",
              "null-query": "null query", "10000-word-query": "10,000-word query"}
    for case in CASES:
        label = labels.get(case.name) or case.name.removeprefix("unicode-").removesuffix("-query").split("-")[0]
        assert label in table, case.name
