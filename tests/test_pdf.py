"""From a folder of PDFs to training and evaluation sets: `vdr data from-pdf` and `vdr data queries`.

The real PDFs are four manuals of Asymptote from Debian's asymptote-doc package (GPL-3+, tests/data/pdfs/NOTICE); the
bad ones are written here: encrypted, truncated, with no pages, a text file, a scanned page (no text layer) and an A0
poster.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import datasets
import pytest
from PIL import Image, ImageDraw

from vdr.data import pdf as from_pdf_module
from vdr.data.pdf import RenderSettings, from_pdf
from vdr.data.queries import QueryCounts, QueryOptions, make_queries, select_queries, split_documents
from vdr.data.schema import EvalSet, TrainRows

PDFS = Path(__file__).parent / "data" / "pdfs"
SMALL = RenderSettings(dpi=36, max_pixels=150_000)  # fast: ~300x400 px pages


def minimal_pdf(*, encrypted: bool = False, pages: int = 1, size: tuple[int, int] = (200, 200)) -> bytes:
    """A hand-written PDF: ``pages`` empty pages of ``size`` points, or an encrypted one whose password is not empty."""
    kids = " ".join(f"{3 + i} 0 R" for i in range(pages))
    objects = [b"<< /Type /Catalog /Pages 2 0 R >>", f"<< /Type /Pages /Kids [{kids}] /Count {pages} >>".encode()]
    objects += [f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 {size[0]} {size[1]}] >>".encode()] * pages
    if encrypted:  # the standard security handler, with an owner/user key that the empty password does not match
        objects.append(b"<< /Filter /Standard /V 1 /R 2 /O <" + b"11" * 32 + b"> /U <" + b"22" * 32 + b"> /P -4 >>")
    out, offsets = bytearray(b"%PDF-1.4\n"), []
    for number, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % number + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % offset for offset in offsets)
    trailer = b"<< /Size %d /Root 1 0 R" % (len(objects) + 1)
    if encrypted:
        trailer += b" /Encrypt %d 0 R /ID [<%s> <%s>]" % (len(objects), b"33" * 16, b"33" * 16)
    return bytes(out + b"trailer\n" + trailer + b" >>\nstartxref\n%d\n%%%%EOF\n" % xref)


@pytest.fixture
def mixed_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "pdfs"
    (folder / "manuals").mkdir(parents=True)
    shutil.copy(PDFS / "asyRefCard.pdf", folder / "manuals" / "asyRefCard.pdf")  # 3 pages with text
    (folder / "locked.pdf").write_bytes(minimal_pdf(encrypted=True))
    (folder / "truncated.pdf").write_bytes((PDFS / "CAD.pdf").read_bytes()[:3000])
    (folder / "empty.pdf").write_bytes(minimal_pdf(pages=0))
    (folder / "notes.txt").write_text("not a pdf")
    scan = Image.new("RGB", (300, 400), "white")
    ImageDraw.Draw(scan).rectangle([40, 40, 260, 120], fill="black")
    scan.save(folder / "scan.pdf")  # an image-only PDF: no text layer
    (folder / "poster.pdf").write_bytes(minimal_pdf(size=(2384, 3370)))  # A0 in points
    return folder


def test_from_pdf_renders_good_files_and_names_each_bad_one(mixed_folder: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    assert from_pdf_module.main(["--input", str(mixed_folder), "--output", str(out), "--dpi", "36",
                                 "--max-pixels", "150000", "--workers", "0", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    skipped = {Path(path).name: reason for path, reason in summary["skipped"].items()}
    assert skipped == {"locked.pdf": "encrypted: it needs a password",
                       "truncated.pdf": skipped["truncated.pdf"],
                       "empty.pdf": "the PDF has no pages (or a page tree PDFium cannot read)",
                       "notes.txt": "not a PDF (no %PDF- header in its first 1024 bytes)"}
    assert skipped["truncated.pdf"].startswith("corrupt or unreadable PDF") and "Data format error" in skipped[
        "truncated.pdf"]
    for name in skipped:
        assert f"skipped {mixed_folder}" in printed and name in printed  # named as soon as known
    assert summary["files_skipped"] == 4 and summary["documents"] == 3 and summary["pages"] == 5
    # The scan and the blank poster have no text layer: kept, counted and named.
    assert summary["without_text"] == {"poster": [1], "scan": [1]} and summary["pages_without_text"] == 2
    pages = datasets.load_from_disk(str(out / "pages"))
    assert pages.column_names == ["image", "doc_id", "page", "text", "width", "height", "source"]
    assert pages["doc_id"] == ["manuals/asyRefCard"] * 3 + ["poster", "scan"]
    assert pages["page"] == [1, 2, 3, 1, 1]
    assert "Asymptote Reference Card" in pages[0]["text"] and pages[3]["text"] == ""
    for row in pages:
        assert row["image"].size == (row["width"], row["height"])
        assert row["width"] * row["height"] <= SMALL.max_pixels
    # An A4 page at 36 dpi is 298 x 421 px (within the cap); the A0 poster is scaled down to fit it, not cropped.
    assert pages[0]["image"].size == (298, 421)
    poster = pages[3]["image"]
    assert abs(poster.width / poster.height - 2384 / 3370) < 0.01 and poster.width * poster.height > 0.95 * 150_000


def test_from_pdf_resumes_and_redoes_changed_files(mixed_folder: Path, tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "out"
    first = from_pdf([str(mixed_folder)], out, SMALL, progress=False)
    assert first["documents_reused"] == 0
    before = datasets.load_from_disk(str(out / "pages"))["text"]
    calls = []
    import pypdfium2

    real = pypdfium2.PdfDocument
    monkeypatch.setattr(pypdfium2, "PdfDocument", lambda path, *a, **k: calls.append(Path(path).name) or real(path))
    again = from_pdf([str(mixed_folder)], out, SMALL, progress=False)
    assert again["documents_reused"] == 3 and again["pages"] == 5
    assert sorted(calls) == ["empty.pdf", "locked.pdf", "truncated.pdf"]  # skipped files are looked at again
    assert datasets.load_from_disk(str(out / "pages"))["text"] == before
    # A changed file (and only it) is rendered again; so is everything after a change of settings.
    scan = mixed_folder / "scan.pdf"
    os.utime(scan, ns=(scan.stat().st_atime_ns, scan.stat().st_mtime_ns + 10**9))
    calls.clear()
    assert from_pdf([str(mixed_folder)], out, SMALL, progress=False)["documents_reused"] == 2
    assert "scan.pdf" in calls and "asyRefCard.pdf" not in calls
    assert from_pdf([str(mixed_folder)], out, RenderSettings(30, 150_000), progress=False)["documents_reused"] == 0


def test_from_pdf_in_worker_processes_matches_one_process(tmp_path: Path) -> None:
    one = from_pdf([str(PDFS / "TeXShopAndAsymptote.pdf"), str(PDFS / "asyRefCard.pdf")], tmp_path / "one", SMALL,
                   workers=0, progress=False)
    two = from_pdf([str(PDFS / "TeXShopAndAsymptote.pdf"), str(PDFS / "asyRefCard.pdf")], tmp_path / "two", SMALL,
                   workers=2, progress=False)
    assert one["pages"] == two["pages"] == 5
    a, b = (datasets.load_from_disk(str(tmp_path / name / "pages")) for name in ("one", "two"))
    assert a["doc_id"] == b["doc_id"] and a["text"] == b["text"]
    assert [r["image"].tobytes() for r in a] == [r["image"].tobytes() for r in b]


def test_from_pdf_refuses_bad_arguments_before_rendering(tmp_path: Path, capsys) -> None:
    assert from_pdf_module.main(["--input", str(tmp_path / "missing"), "--output", str(tmp_path / "o")]) == 1
    assert "--input" in capsys.readouterr().err and not (tmp_path / "o").exists()
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "precious.txt").write_text("keep me")
    assert from_pdf_module.main(["--input", str(PDFS), "--output", str(tmp_path / "taken")]) == 1
    assert "not written by `vdr data from-pdf`" in capsys.readouterr().err
    assert (tmp_path / "taken" / "precious.txt").read_text() == "keep me"
    with pytest.raises(ValueError, match="--dpi"):
        from_pdf([str(PDFS)], tmp_path / "o", RenderSettings(dpi=0))


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("rendered")
    from_pdf([str(PDFS)], out, SMALL, progress=False)
    return out


def test_text_layer_queries_split_by_document_into_both_schemas(rendered: Path, tmp_path: Path) -> None:
    out = tmp_path / "queries"
    summary = make_queries(str(rendered), str(out), QueryOptions(per_page=2, eval_fraction=0.25), progress=False)
    assert summary["pages"] == 23 and summary["kept"] == 46 and summary["pages_without_queries"] == 0
    train = datasets.load_from_disk(str(out / "train"))
    rows = TrainRows(train, "train")  # the training schema, validated as `vdr fit` and `vdr mine` do
    assert len(rows) == summary["train_rows"] == len(train)
    eval_set = EvalSet.from_tables("eval", *(datasets.load_from_disk(str(out / "eval" / t))
                                             for t in ("queries", "corpus", "qrels")))
    eval_documents = set(summary["eval_documents"])
    assert len(eval_documents) == 1  # a quarter of 4 documents
    assert summary["eval_corpus"] < 10 and "NDCG@10 needs at least 10" in summary["warnings"][0]
    assert not eval_documents & set(train["doc_id"])  # no document on both sides
    assert {c.split("#page=")[0] for c in eval_set.corpus_ids} == eval_documents
    assert all(len(relevant) == 1 for relevant in eval_set.qrels)  # each query judged against its own page
    for query_id, relevant in zip(eval_set.query_ids, eval_set.qrels):
        assert eval_set.corpus_ids[next(iter(relevant))] == query_id.rsplit("#q=", 1)[0]
    assert all(q.endswith("?") for q in list(train["query"]) + eval_set.query_texts)
    per_page = {}
    for doc, page in zip(train["doc_id"], train["page"]):
        per_page[doc, page] = per_page.get((doc, page), 0) + 1
    assert set(per_page.values()) == {2}


def test_queries_refuse_a_bad_data_folder_and_keep_an_existing_output(rendered: Path, tmp_path: Path, capsys) -> None:
    from vdr.data.queries import main

    assert main(["--data", str(tmp_path / "nothing"), "--output", str(tmp_path / "q")]) == 1
    assert "no such folder" in capsys.readouterr().err
    datasets.Dataset.from_dict({"image": ["a.png"], "query": ["q"]}).save_to_disk(str(tmp_path / "wrong"))
    assert main(["--data", str(tmp_path / "wrong"), "--output", str(tmp_path / "q")]) == 1
    assert "missing columns ['doc_id', 'page', 'text']" in capsys.readouterr().err
    (tmp_path / "q").mkdir()
    (tmp_path / "q" / "mine.txt").write_text("keep")
    assert main(["--data", str(rendered), "--output", str(tmp_path / "q"), "--no-progress"]) == 1
    assert "already exists" in capsys.readouterr().err and (tmp_path / "q" / "mine.txt").read_text() == "keep"
    assert main(["--data", str(rendered), "--output", str(tmp_path / "r"), "--prompt", "write {n} questions"]) == 1
    assert "--prompt" in capsys.readouterr().err


def test_generated_answers_are_cleaned_and_what_is_dropped_is_counted() -> None:
    counts = QueryCounts()
    answer = ("1. What is the default pen width?\n"
              "2) \"How are arrays declared in Asymptote?\"\n"
              "- what is the default pen width?\n"  # a duplicate, up to case
              "Arrays are declared with brackets.\n"  # not a question
              "\n"
              "Why?\n"  # too short
              "What does the unitsize command\n"  # cut off by the token limit
              "Which page explains the reference card?\n"  # another page's already
              "* Which command draws a circle?\n"
              "What else?")
    taken = {"which page explains the reference card?"}
    kept = select_queries(answer.splitlines(), 3, 3, 30, counts, taken)
    assert kept == ["What is the default pen width?", "How are arrays declared in Asymptote?",
                    "Which command draws a circle?"]
    assert counts.dropped == {"duplicate": 1, "not a question": 2, "empty": 1, "fewer than 3 words": 1,
                              "another page's query": 1}
    assert counts.generated == 9 and counts.kept == 3  # the line after the third kept one is not looked at
    assert "which command draws a circle?" in taken


def test_text_layer_questions_skip_running_headers_and_page_numbers() -> None:
    from vdr.data.queries import headings, text_layer_candidates

    assert headings("Contents\nGetting started ........ 1\nPackage options 4\nThe end.") == ["Getting started",
                                                                                           "Package options"]
    texts = [f"Widget Manual Version Two\nSection {i} Wiring the {name} board\n{name} voltage and current limits"
             for i, name in enumerate(["alpha", "beta", "gamma"])]
    candidates = text_layer_candidates(texts, 2, ["manual"] * 3)
    for page, questions in zip(["alpha", "beta", "gamma"], candidates):
        assert not any("Widget Manual" in q for q in questions)  # on every page of its document: a header
        assert page in questions[0].lower()
    # Across documents, the same heading is a heading of each.
    assert "Widget Manual Version Two" in text_layer_candidates(texts[:2], 2, ["a", "b"])[0][0]


def test_documents_split_is_seeded_and_leaves_both_sides_non_empty() -> None:
    docs = [f"d{i}" for i in range(10)]
    assert split_documents(docs, 0.2, 0) == split_documents(docs, 0.2, 0) and len(split_documents(docs, 0.2, 0)) == 2
    assert split_documents(docs, 0.2, 0) != split_documents(docs, 0.2, 1)
    assert len(split_documents(["a", "b"], 0.99, 0)) == 1 and split_documents(["a"], 0.5, 0) == set()
    assert split_documents(docs, 0.0, 0) == set()


def test_generator_answers_become_both_sets(rendered: Path, tmp_path: Path) -> None:
    """The generator path of `make_queries` with a stand-in generator: batches of pages in, one answer per page."""
    calls = []

    def generator(images, k):
        calls.append(len(images))
        return [f"1. What does figure {len(calls)}.{i} show?\n2) Plot of data\n3. What does figure {len(calls)}.{i} "
                f"show?\n- Which options does part {i} of batch {len(calls)} list?" for i in range(len(images))]

    summary = make_queries(str(rendered), str(tmp_path / "q"), QueryOptions(per_page=2, batch_size=5),
                           generator=generator, progress=False)
    assert calls == [5, 5, 5, 5, 3] and summary["source"] == "generator"
    assert summary["kept"] == 46 and summary["dropped"] == {"not a question": 23, "duplicate": 23}
    train = datasets.load_from_disk(str(tmp_path / "q" / "train"))
    assert train[0]["query"] == "What does figure 1.0 show?" and train[1]["query"].startswith("Which options")


def test_nothing_is_written_when_no_query_is_kept(rendered: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"no query was kept for the training documents.*\"not a question\": 23"):
        make_queries(str(rendered), str(tmp_path / "q"), generator=lambda images, k: ["Plot of data"] * len(images),
                     progress=False)
    assert not (tmp_path / "q").exists()


def test_a_tiny_qwen3_vl_generates_batched_and_its_output_is_filtered(rendered: Path, tmp_path: Path) -> None:
    """The real generation path with a random tiny Qwen3-VL, saved and loaded like a hub model: its answers are token
    soup, so every candidate is dropped and counted, and nothing is written."""
    from vdr.data.queries import QueryGenerator
    from vdr.models.backbone import load_backbone

    backbone = load_backbone("tiny", min_pixels=32 * 32, max_pixels=64 * 64, lm_head=True)
    backbone.model.save_pretrained(tmp_path / "generator")
    backbone.processor.save_pretrained(tmp_path / "generator")
    generator = QueryGenerator(str(tmp_path / "generator"), max_new_tokens=12, device="cpu", max_pixels=64 * 64)
    images = [Image.new("RGB", (64, 80), "white"), Image.new("RGB", (90, 60), "gray")]
    answers = generator(images, k=2)
    assert len(answers) == 2 and all(isinstance(a, str) and a for a in answers)
    # Batched with left padding, each answer is the one its page gets alone (right padding, or decoding the prompt
    # too, would change it).
    assert answers == [generator([image], k=2)[0] for image in images]
    with pytest.raises(ValueError, match="no query was kept") as error:
        make_queries(str(rendered), str(tmp_path / "q"), QueryOptions(per_page=2, batch_size=8), generator=generator,
                     progress=False)
    counts = json.loads(str(error.value).split("Queries: ", 1)[1])
    assert counts["pages"] == 23 and counts["kept"] == 0
    assert counts["candidates"] == sum(counts["dropped"].values()) >= 23


def readme_pdf_flow() -> list[list[str]]:
    """The commands of the README's PDF section, one argv each (backslash continuations joined)."""
    import re
    import shlex

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    block = re.search(r"### From a folder of PDFs to a finetuned retriever\n\n```bash\n(.*?)```", readme, re.S)
    assert block, "README.md lost the PDF flow's code block"
    return [shlex.split(line) for line in block.group(1).replace("\\\n", " ").splitlines() if line.strip()]


@pytest.mark.slow
def test_the_readme_pdf_flow_runs_end_to_end(tmp_path: Path, monkeypatch) -> None:
    """PDFs -> pages -> queries -> mined negatives -> fit -> export -> evaluate: the README's six commands as written,
    with the 2B model swapped for a tiny random Qwen3-VL and the sizes and steps turned down for a CPU."""
    from vdr.cli import main
    from vdr.models.backbone import load_backbone

    repo = Path(__file__).parent.parent
    backbone = load_backbone("tiny", min_pixels=4096, max_pixels=4096)
    backbone.model.save_pretrained(tmp_path / "tiny-base")
    backbone.processor.save_pretrained(tmp_path / "tiny-base")
    turned_down = {
        "from-pdf": ["--dpi", "36", "--max-pixels", "150000", "--workers", "2", "--no-progress"],
        "queries": ["--eval-fraction", "0.5", "--seed", "1", "--no-progress"],  # 13 of the 23 pages: NDCG@10 needs 10
        "mine": ["--relative_margin", "null"],  # a random model scores every page alike: its margins drop them all
        "fit": ["--model.backbone.name_or_path", "tiny", "--model.backbone.min_pixels", "4096",
                "--model.backbone.max_pixels", "4096", "--model.backbone.dtype", "float32",
                "--model.loss.init_args.dims", "[32, 16]", "--model.optimizer.init_args.fused", "false",
                "--trainer.accelerator", "cpu", "--trainer.precision", "32-true", "--trainer.max_steps", "4",
                "--data.batch_size", "8", "--data.eval_batch_size", "16", "--data.num_workers", "0",
                "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"],
    }
    monkeypatch.chdir(tmp_path)
    commands = readme_pdf_flow()
    assert [c[:2] for c in commands] == [["vdr", "data"], ["vdr", "data"], ["vdr", "mine"], ["vdr", "fit"],
                                         ["vdr", "export"], ["vdr", "evaluate"]]
    for command in commands:
        argv = [str(PDFS) if a == "path/to/pdfs" else str(tmp_path / "tiny-base") if a.startswith("Qwen/")
                else str(repo / a) if a.startswith("configs/") else a for a in command[1:]]
        argv += turned_down.get(argv[1] if argv[0] == "data" else argv[0], [])
        assert main(argv) == 0, argv
    summary = json.loads((tmp_path / "checkpoints/data/my-pdfs/summary.json").read_text())
    assert summary["documents"] == 4 and summary["pages"] == 23
    queries = json.loads((tmp_path / "checkpoints/data/my-queries/queries.json").read_text())
    mined = datasets.load_from_disk(str(tmp_path / "checkpoints/data/my-mined"))
    assert len(mined) == queries["train_rows"] and "negative_0" in mined.column_names
    report = json.loads((tmp_path / "checkpoints/pdfs-st.json").read_text())
    assert report["num_queries"] == queries["eval_queries"] == 26 and report["num_documents"] == 13
    assert 0.0 <= report["ndcg@10"] <= 1.0


class KillsItsWorker:
    """Unpickled in a worker process, it ends that process at once (as a PDFium crash or an OOM kill would)."""

    def __reduce__(self):
        return os._exit, (3,)


def test_a_dying_worker_is_named_and_the_other_documents_still_render(tmp_path: Path) -> None:
    from tqdm import tqdm

    from vdr.data.pdf import _render_in_processes, shard_name

    good = [(str(PDFS / name), name[:-4], str(tmp_path / shard_name(name[:-4])), SMALL)
            for name in ("TeXShopAndAsymptote.pdf", "asyRefCard.pdf")]
    deadly = (str(PDFS / "CAD.pdf"), "CAD", str(tmp_path / "CAD"), KillsItsWorker())
    results = {r.doc_id: r for r in _render_in_processes([good[0], deadly, good[1]], 2, tqdm(disable=True))}
    assert results["CAD"].skipped == "its renderer process died (crash or out of memory)"
    assert results["TeXShopAndAsymptote"].pages == 2 and results["asyRefCard"].pages == 3
    assert not (tmp_path / "CAD").exists()
