"""``vdr data queries``: search queries for rendered pages, as a training set and an evaluation set.

Queries come from a Qwen3-VL instruct model that looks at each page (``--model``, e.g. ``Qwen/Qwen3-VL-2B-Instruct``,
batched ``generate``, greedy), or, without a model, from the page's text layer: its most distinctive phrases (TF-IDF
over the pages' word n-grams) and its headings, put as questions. Either way each query is cleaned (numbering,
bullets, quotes and whitespace removed), and dropped and counted if empty, not a question, shorter or longer than the
word bounds, or a duplicate on its page.

Documents, not pages, are split between training and evaluation (a seeded draw of ``--eval-fraction`` of them), so
no document has pages on both sides. Output, beside a ``queries.json`` summary:

- ``train``: ``query``, ``image`` (the page), ``doc_id``, ``page``: the training schema (mine negatives next);
- ``eval/queries`` (``id``, ``text``), ``eval/corpus`` (``id``, ``image``: every page of the evaluation documents,
  so a query's neighbours in its own document are its distractors), ``eval/qrels`` (``query_id``, ``corpus_id``,
  ``score`` 1): the evaluation schema.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import shutil
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_PROMPT = (
    "You are helping build a search engine over document pages. Write {k} different questions that a person "
    "searching a document collection could ask and that this page answers. Each question should be specific to "
    "the page's content (names, numbers, terms it shows), make sense without seeing the page, and end with a "
    "question mark. Write one question per line, nothing else."
)
STOPWORDS = frozenset(
    "a an the and or but if then else of to in on at by for with from as is are was were be been being this that "
    "these those it its it's into than such not no nor so too very can will just do does did doing have has had "
    "having you your we our they their he she his her them us i me my which who whom what when where why how all "
    "any both each few more most other some same own only also may might must shall should would could there here "
    "about above below under over again further once between through during before after up down out off use used "
    "using one two see page figure table section chapter fig".split()
)
HEADING = re.compile(r"^(?:\d+(?:\.\d+)*\.?\s+)?([A-Z][\w'’\-]*(?:\s+[\w'’\-&/]+){0,7})$")
TOC_TAIL = re.compile(r"(?:\s*\.{2,}\s*|\s+)\d+$")  # a table of contents' dot leaders and page number
WORD = re.compile(r"[A-Za-z][A-Za-z0-9'’\-]*[A-Za-z0-9]")  # two characters or more
LEADING_JUNK = re.compile(r"^\s*(?:(?:[-*•·>]+|\(?\d{1,3}[.):\]]|\(?[a-zA-Z][.)]|q\d*[:.)])\s*)+", re.IGNORECASE)


@dataclass
class QueryCounts:
    """What became of the candidate queries."""

    pages: int = 0
    pages_without_text: int = 0  # text-layer mode: no words to derive a query from
    pages_without_queries: int = 0  # every candidate dropped
    generated: int = 0
    kept: int = 0
    dropped: Counter = field(default_factory=Counter)  # reason -> count

    def as_dict(self) -> dict:
        return {"pages": self.pages, "pages_without_text": self.pages_without_text,
                "pages_without_queries": self.pages_without_queries, "candidates": self.generated, "kept": self.kept,
                "dropped": dict(self.dropped)}


def clean_query(line: str) -> str:
    """One candidate with list markers, numbering, wrapping quotes and extra whitespace removed."""
    text = LEADING_JUNK.sub("", line.strip())
    text = text.strip().strip("\"'“”‘’`").strip()
    return re.sub(r"\s+", " ", text)


def is_question(text: str) -> bool:
    """Words ending with a question mark (a generator's answer cut off by its token limit has none)."""
    return text.endswith("?") and len(text.rstrip("?").split()) > 0


def select_queries(candidates: list[str], k: int, min_words: int, max_words: int, counts: QueryCounts,
                   taken: set[str] | None = None) -> list[str]:
    """The first ``k`` acceptable candidates, each cleaned; those passed over on the way counted by the reason they were
    dropped (candidates after the ``k``-th kept one are not looked at). ``taken`` holds the queries other pages kept
    (lower-cased): the same query for two pages would be a contradiction for training and for the qrels."""
    kept: list[str] = []
    seen: set[str] = set()
    taken = set() if taken is None else taken
    for raw in candidates:
        if len(kept) >= k:
            break
        counts.generated += 1
        text = clean_query(raw)
        words = len(text.split())
        if not text:
            reason = "empty"
        elif not is_question(text):
            reason = "not a question"
        elif words < min_words:
            reason = f"fewer than {min_words} words"
        elif words > max_words:
            reason = f"more than {max_words} words"
        elif text.lower() in seen:
            reason = "duplicate"
        elif text.lower() in taken:
            reason = "another page's query"
        else:
            seen.add(text.lower())
            taken.add(text.lower())
            kept.append(text)
            continue
        counts.dropped[reason] += 1
    counts.kept += len(kept)
    return kept


# Queries from the text layer ------------------------------------------------------------------------------------------


def _phrases(text: str, longest: int = 3) -> list[str]:
    """Word n-grams (1..longest) of a page that neither start nor end with a stopword, in reading order."""
    grams = []
    for line in text.splitlines():
        words = WORD.findall(line)
        for n in range(1, longest + 1):
            for i in range(len(words) - n + 1):
                gram = words[i : i + n]
                if gram[0].lower() in STOPWORDS or gram[-1].lower() in STOPWORDS or (n == 1 and len(gram[0]) < 4):
                    continue
                grams.append(" ".join(gram))
    return grams


def headings(text: str) -> list[str]:
    """Short lines that read like titles: a capital first word, 2-8 words, no final period, mostly letters."""
    found = []
    for line in text.splitlines():
        line = TOC_TAIL.sub("", line.strip())
        match = HEADING.match(line)
        if not match or line.endswith((".", ",", ";", ":")):
            continue
        title = match.group(1)
        words = title.split()
        letters = sum(ch.isalpha() for ch in title)
        if 2 <= len(words) <= 8 and letters >= 0.7 * len(title.replace(" ", "")):
            found.append(title)
    return found


def text_layer_candidates(texts: list[str], per_page: int, documents: list[str] | None = None) -> list[list[str]]:
    """For each page, up to ``3 x per_page`` questions from its headings and most distinctive phrases.

    A heading found on more than one page of its document (a running header) is not one, nor a phrase found on more
    than half of its document's pages (a running title; it names no page). A phrase's weight on a page is its count
    there times ``log(pages / pages containing it)`` (TF-IDF), times its length in words (a three-word term names more
    than one word does); a phrase inside a kept one is passed over.
    """
    documents = documents if documents is not None else ["" for _ in texts]
    page_headings = [list(dict.fromkeys(headings(t))) for t in texts]
    repeated = Counter((doc, h) for doc, found in zip(documents, page_headings) for h in found)
    phrases = [_phrases(t) for t in texts]
    grams_per_page = [Counter(g.lower() for g in found) for found in phrases]
    spelled = [{g.lower(): g for g in found} for found in phrases]
    document_frequency = Counter(g for grams in grams_per_page for g in grams)
    pages_of = Counter(documents)
    within = Counter((doc, g) for doc, grams in zip(documents, grams_per_page) for g in grams)
    n = len(texts)
    out = []
    for doc, found, grams, spelling in zip(documents, page_headings, grams_per_page, spelled):
        questions = [f"What does the section \"{h}\" cover?" for h in found if repeated[doc, h] == 1][:per_page]
        ranked = sorted(grams, key=lambda g: (-grams[g] * math.log((n + 1) / document_frequency[g]) * len(g.split()),
                                              g))
        chosen: list[str] = []
        for gram in ranked:
            if len(chosen) >= 3 * per_page:
                break
            if any(gram in c or c in gram for c in chosen):
                continue
            if pages_of[doc] > 1 and within[doc, gram] > pages_of[doc] / 2:
                continue
            chosen.append(gram)
        questions += [f"What does the documentation say about {spelling[g]}?" for g in chosen]
        out.append(questions)
    return out


# Queries from a generator ---------------------------------------------------------------------------------------------


class QueryGenerator:
    """A Qwen3-VL instruct model that writes questions about page images (transformers ``generate``, greedy).

    Args:
        model: A hub id (``Qwen/Qwen3-VL-2B-Instruct``) or a local directory saved with ``save_pretrained``.
        prompt: The instruction; ``{k}`` is replaced by the number of questions per page.
        max_new_tokens: Longest answer, in tokens.
        device: ``cuda``, ``cpu``... (default: a GPU when there is one).
        max_pixels: Page area bound for the model's image processor (None: the processor's own).
    """

    def __init__(self, model: str, prompt: str = DEFAULT_PROMPT, max_new_tokens: int = 128,
                 device: str | None = None, max_pixels: int | None = None) -> None:
        import torch
        from transformers import AutoProcessor, Qwen3VLForConditionalGeneration

        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.model = Qwen3VLForConditionalGeneration.from_pretrained(model, dtype=dtype).to(self.device).eval()
        self.processor = AutoProcessor.from_pretrained(model)
        if max_pixels is not None:
            from vdr.models.processor import set_pixel_bounds

            smallest = self.processor.image_processor.size.get("shortest_edge", 0)
            set_pixel_bounds(self.processor, min(smallest, max_pixels), max_pixels)
        self.prompt, self.max_new_tokens = prompt, max_new_tokens

    def __call__(self, images: list, k: int) -> list[str]:
        """One answer per image (the raw text after the prompt)."""
        import torch

        messages = [[{"role": "user", "content": [{"type": "image"},
                                                  {"type": "text", "text": self.prompt.format(k=k)}]}]
                    for _ in images]
        texts = [self.processor.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in messages]
        tokenizer = self.processor.tokenizer
        tokenizer.padding_side = "left"  # generation continues each row from its end
        inputs = self.processor(text=texts, images=list(images), padding=True, return_tensors="pt",
                                return_mm_token_type_ids=True).to(self.device)
        with torch.inference_mode():
            output = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False,
                                         pad_token_id=tokenizer.pad_token_id)
        return tokenizer.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


# The command ---------------------------------------------------------------------------------------------------------


@dataclass
class QueryOptions:
    """The command's knobs: queries per page, the share of documents held out, the draw's seed, the word bounds of a
    query and the pages per ``generate`` call."""

    per_page: int = 2
    eval_fraction: float = 0.2
    seed: int = 0
    min_words: int = 3
    max_words: int = 30
    batch_size: int = 4


def load_pages(data: str):
    """The pages table of ``vdr data from-pdf`` (its output folder or the ``pages`` dataset itself), checked."""
    import datasets

    path = Path(data)
    if (path / "pages").is_dir():
        path = path / "pages"
    if not path.is_dir():
        raise FileNotFoundError(f"--data {data}: no such folder (expected the output of `vdr data from-pdf`)")
    try:
        pages = datasets.load_from_disk(str(path))
    except Exception as error:
        raise ValueError(f"--data {path}: not a saved dataset ({error})") from error
    missing = [c for c in ("image", "doc_id", "page", "text") if c not in pages.column_names]
    if missing:
        raise ValueError(f"--data {path}: missing columns {missing} (has {pages.column_names}); expected the pages "
                         "table of `vdr data from-pdf`")
    return pages


def split_documents(doc_ids: list[str], eval_fraction: float, seed: int) -> set[str]:
    """The documents that go to evaluation: a seeded draw of ``eval_fraction`` of them (at least one when the fraction
    is positive and there are two or more documents; never all of them)."""
    documents = sorted(set(doc_ids))
    if eval_fraction <= 0 or len(documents) < 2:
        return set()
    count = min(len(documents) - 1, max(1, round(eval_fraction * len(documents))))
    return set(random.Random(seed).sample(documents, count))


def write_query_sets(pages, queries: list[list[str]], eval_documents: set[str], output: Path) -> dict:
    """Writes ``train`` and ``eval/{queries,corpus,qrels}`` under ``output`` (see the module docstring)."""
    import datasets

    from vdr.data.writing import write_dataset

    pages = pages.cast_column("image", datasets.Image(decode=False))
    image = datasets.Image()
    train_features = datasets.Features({"query": datasets.Value("string"), "image": image,
                                        "doc_id": datasets.Value("string"), "page": datasets.Value("int32")})
    doc_ids, numbers = list(pages["doc_id"]), list(pages["page"])  # plain lists: a column lookup per row is slow

    def page_id(row: int) -> str:
        return f"{doc_ids[row]}#page={numbers[row]}"

    train_rows = [row for row in range(len(pages)) if doc_ids[row] not in eval_documents]
    eval_rows = [row for row in range(len(pages)) if doc_ids[row] in eval_documents]
    if not any(queries[row] for row in train_rows):
        raise ValueError("no query was kept for the training documents: nothing written")
    if eval_documents and not any(queries[row] for row in eval_rows):
        raise ValueError(f"no query was kept for the evaluation documents {sorted(eval_documents)}: nothing written")

    def images(rows: list[int]) -> Iterator[tuple[int, dict]]:  # undecoded PNG bytes, read in one pass
        return zip(rows, pages.select(rows).select_columns(["image"]))

    write_dataset(({"query": q, "image": page["image"], "doc_id": doc_ids[row], "page": numbers[row]}
                   for row, page in images(train_rows) for q in queries[row]), train_features, output / "train")
    query_table = [{"id": f"{page_id(row)}#q={i}", "text": q, "corpus_id": page_id(row)}
                   for row in eval_rows for i, q in enumerate(queries[row])]
    summary = {"train_rows": sum(len(queries[r]) for r in train_rows), "train_pages": len(train_rows),
               "train_documents": len({doc_ids[r] for r in train_rows}), "eval_queries": len(query_table),
               "eval_corpus": len(eval_rows), "eval_documents": sorted(eval_documents)}
    if not eval_rows:
        return summary
    write_dataset(({"id": page_id(row), "image": page["image"]} for row, page in images(eval_rows)),
                  datasets.Features({"id": datasets.Value("string"), "image": image}), output / "eval" / "corpus")
    write_dataset(({"id": q["id"], "text": q["text"]} for q in query_table),
                  datasets.Features({"id": datasets.Value("string"), "text": datasets.Value("string")}),
                  output / "eval" / "queries")
    write_dataset(({"query_id": q["id"], "corpus_id": q["corpus_id"], "score": 1} for q in query_table),
                  datasets.Features({"query_id": datasets.Value("string"), "corpus_id": datasets.Value("string"),
                                     "score": datasets.Value("int32")}), output / "eval" / "qrels")
    return summary


def make_queries(data, output: str, options: QueryOptions | None = None,
                 generator: QueryGenerator | None = None, overwrite: bool = False, progress: bool = True) -> dict:
    """Queries for every page of ``data`` (a path for :func:`load_pages`, or the table it loaded), written to
    ``output`` (see the module docstring); returns the summary."""
    from tqdm.auto import tqdm

    from vdr.data.writing import check_target, move_into_place, temporary_sibling

    options = options or QueryOptions()
    if options.per_page < 1 or not 0 <= options.eval_fraction < 1 or options.min_words < 1 \
            or options.max_words < options.min_words or options.batch_size < 1:
        raise ValueError(f"invalid options {options}: need per_page >= 1, 0 <= eval_fraction < 1, "
                         "1 <= min_words <= max_words, batch_size >= 1")
    output_dir = Path(output)
    check_target(output_dir, overwrite)
    pages = load_pages(data) if isinstance(data, str | Path) else data
    start = time.perf_counter()
    counts = QueryCounts(pages=len(pages))
    texts, doc_ids = list(pages["text"]), list(pages["doc_id"])
    queries: list[list[str]] = []
    taken: set[str] = set()  # every page's queries so far: no query is kept for two pages
    if generator is None:
        candidates = text_layer_candidates(texts, options.per_page, doc_ids)
        for text, page_candidates in zip(texts, candidates):
            counts.pages_without_text += not text.strip()
            queries.append(select_queries(page_candidates, options.per_page, options.min_words, options.max_words,
                                          counts, taken))
    else:
        bar = tqdm(total=len(pages), unit="page", desc="generating", disable=not progress)
        for first in range(0, len(pages), options.batch_size):
            batch = pages.select(range(first, min(first + options.batch_size, len(pages))))
            for answer in generator([image.convert("RGB") for image in batch["image"]], options.per_page):
                queries.append(select_queries(answer.splitlines(), options.per_page, options.min_words,
                                              options.max_words, counts, taken))
            bar.update(len(batch))
        bar.close()
    counts.pages_without_queries = sum(not q for q in queries)
    # Drawn among documents with queries: a document without any (a scan) could not be evaluated.
    with_queries = [doc for doc, page_queries in zip(doc_ids, queries) if page_queries]
    eval_documents = split_documents(with_queries, options.eval_fraction, options.seed)
    staging = temporary_sibling(output_dir)
    try:
        written = write_query_sets(pages, queries, eval_documents, staging)
    except ValueError as error:
        shutil.rmtree(staging, ignore_errors=True)
        raise ValueError(f"{error}. Queries: {json.dumps(counts.as_dict())}") from error
    summary = {"source": "generator" if generator is not None else "text layer", **counts.as_dict(), **written,
               "options": options.__dict__, "seconds": round(time.perf_counter() - start, 1), "warnings": []}
    if 0 < written["eval_corpus"] < 10:
        summary["warnings"].append(f"the evaluation corpus has {written['eval_corpus']} pages: NDCG@10 needs at least "
                                   "10 (`vdr evaluate` refuses fewer); raise --eval-fraction or add documents")
    (staging / "queries.json").write_text(json.dumps(summary, indent=2))
    move_into_place(staging, output_dir)
    return summary


def main(argv: list[str] | None = None) -> int:
    """``vdr data queries``."""
    defaults = QueryOptions()
    parser = argparse.ArgumentParser(prog="vdr data queries", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="the output folder of `vdr data from-pdf`")
    parser.add_argument("--output", required=True, help="destination folder (train, eval, queries.json)")
    parser.add_argument("--model", help="a Qwen3-VL instruct model (hub id or folder); none: the text layer")
    parser.add_argument("--per-page", type=int, default=defaults.per_page, help="queries per page (%(default)s)")
    parser.add_argument("--eval-fraction", type=float, default=defaults.eval_fraction,
                        help="share of documents for evaluation (%(default)s)")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--min-words", type=int, default=defaults.min_words)
    parser.add_argument("--max-words", type=int, default=defaults.max_words)
    parser.add_argument("--prompt", default=DEFAULT_PROMPT, help="generator instruction; {k}: queries per page")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size, help="pages per generate call")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--max-pixels", type=int, help="page area bound for the generator's image processor")
    parser.add_argument("--device", help="generator device (default: cuda when available)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    options = QueryOptions(args.per_page, args.eval_fraction, args.seed, args.min_words, args.max_words,
                           args.batch_size)
    try:
        args.prompt.format(k=args.per_page)
    except (KeyError, IndexError, ValueError) as error:
        print(f"error: --prompt: only {{k}} may be a placeholder ({error!r}); double other braces", file=sys.stderr)
        return 1
    try:
        pages = load_pages(args.data)  # a bad --data fails before a model is loaded
        generator = None
        if args.model:
            generator = QueryGenerator(args.model, args.prompt, args.max_new_tokens, args.device, args.max_pixels)
        summary = make_queries(pages, args.output, options, generator, args.overwrite, not args.no_progress)
    except (FileNotFoundError, FileExistsError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    dropped = ", ".join(f"{n} {reason}" for reason, n in summary["dropped"].items()) or "none"
    for warning in summary["warnings"]:
        print(f"warning: {warning}", file=sys.stderr)
    print(f"{summary['kept']} queries from {summary['source']} for {summary['pages']} pages "
          f"({summary['pages_without_queries']} pages without any; {summary['pages_without_text']} without text); "
          f"dropped: {dropped}. train: {summary['train_rows']} rows from {summary['train_documents']} documents; "
          f"eval: {summary['eval_queries']} queries over {summary['eval_corpus']} pages of "
          f"{len(summary['eval_documents'])} documents. {args.output}/queries.json")
    return 0 if summary["kept"] else 1
