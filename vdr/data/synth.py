"""Deterministic synthetic visual-document-retrieval dataset.

Every page is a small rendered "report page" whose only topic-bearing content is its title (a company name) and
subtitle (the metric on the left, the year on the right, like a report header). Everything else on the page -- tint,
ink colour, filler words, the table or bar chart, and the optional layout jitter -- is sampled from the page's own RNG
without looking at the topic, so a retriever can only match a query such as "what was Acme revenue in 2019" to its
page by reading the title and subtitle.

The title block sits at the same place on every page by default, as on pages printed from one template. A model
trained from random weights, as in the CPU demo, reads glyphs it always sees at one position within a few hundred
steps, but a shift of even 2 pixels (within its 16-pixel patches) is something it has to learn to ignore first, and it
does not within the demo's budget: ``layout_jitter`` brings that harder task back (docs/LOG.md, 2026-11-27).

The generator is split in two stages so that the split logic can be tested without rendering:

* :func:`plan` decides, from the config alone, which (company, metric, year) combo every train row, hard negative,
  eval query and corpus page gets, plus the query texts and a render seed per page.
* :func:`generate` renders the planned pages and writes Hugging Face ``datasets`` to disk atomically.

Run as ``python -m vdr.data.synth --output DIR --seed 0``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple

from PIL import Image, ImageDraw, ImageFont

from vdr.data.writing import check_target, move_into_place, temporary_sibling, write_dataset

# Bump when the rendering or planning changes in a way that alters the produced bytes, so cached datasets can be told
# apart from fresh ones via synth.json.
GENERATOR_VERSION = 2

# Invented names, 4-8 letters, each starting with a different letter so that even a blurry first glyph carries signal.
COMPANIES: tuple[str, ...] = (
    "Acme", "Borvex", "Calyra", "Dunmore", "Elkora", "Fennix", "Gantry", "Hexlo",
    "Ixora", "Jovix", "Kelton", "Lumora", "Mirabo", "Nexar", "Orvia", "Pelko",
    "Quorin", "Rasko", "Stellon", "Tavira", "Umbrix", "Vantor", "Wexley", "Zandor",
)  # fmt: skip
METRICS: tuple[str, ...] = ("Revenue", "Profit", "Costs", "Sales", "Debt", "Assets", "Staff", "Margin")
YEARS: tuple[int, ...] = tuple(range(2015, 2025))

# Filler must not contain company names, metric words or anything year-like, otherwise a page could "mention" a topic
# it is not about and the eval labels would be wrong.
FILLER_WORDS: tuple[str, ...] = (
    "annual", "report", "summary", "overview", "group", "region", "note", "figure", "unit", "segment",
    "review", "outlook", "detail", "basis", "period", "update", "policy", "board", "office", "plan",
    "level", "total", "index", "item", "source", "scope", "field", "change", "trend", "value",
    "stable", "audit", "draft", "final", "page", "section", "local", "global", "internal", "general",
)  # fmt: skip

# The metric is lowercased inside running text; the company keeps its capital as a proper noun. All templates use a
# fixed closed vocabulary, so eval queries contain no word that never occurs in training queries.
QUERY_TEMPLATES: tuple[str, ...] = (
    "what was {company} {metric} in {year}",
    "{company} {metric} {year}",
    "{metric} of {company} for {year}",
    "{company} {metric} for {year}",
)

# Title and subtitle are always drawn strictly above this fraction of the page height and nothing else is drawn there
# except background, so blanked pages differ from normal ones only inside this band.
QUERY_TEXT_BAND = 0.42

_ATTRIBUTES = ("company", "metric", "year")


class Combo(NamedTuple):
    """The topic of a page: the three attributes a query asks about."""

    company: str
    metric: str
    year: int


ALL_COMBOS: tuple[Combo, ...] = tuple(Combo(c, m, y) for c in COMPANIES for m in METRICS for y in YEARS)


@dataclass
class SynthConfig:
    """Parameters of a synthetic dataset; together with the seed they fully determine its bytes.

    Attributes:
        seed: Master seed; the eval split depends only on it, ``num_eval_queries`` and ``distractors_per_query``.
        image_size: Side length of the square pages in pixels (unless ``page_size_range`` is set).
        num_train_pages: Number of train rows (positive pages), cycling over the train combos.
        num_negatives: Hard negatives per train row (pages differing in exactly one attribute); may be 0.
        num_eval_queries: Number of held-out combos used as eval queries.
        distractors_per_query: Hard-distractor corpus pages added per eval query.
        blank_query_text: Omit title and subtitle from every page (everything else is unchanged).
        page_size_range: When set, ``(smallest, largest)`` side in pixels: each page is a square whose side is drawn
            uniformly from this range (inclusive), from its own seed, instead of ``image_size``. Real page sets vary in
            size, and so do their visual-token counts: token-budget batching (``vdr.data.batching``) is measured on
            such data. None (the default) keeps every page at ``image_size``.
        layout_jitter: How far the page margins (and with them the title block) move from page to page, from 0 (the
            default: a fixed place) to 1 (up to +-3 px across and +-2.5 px down at 128 px, generator version 1's
            range). Each page draws its offsets whatever the value, so the rest of its layout does not change with it.
    """

    seed: int = 0
    image_size: int = 128
    num_train_pages: int = 3240
    num_negatives: int = 1
    num_eval_queries: int = 300
    distractors_per_query: int = 4
    blank_query_text: bool = False
    page_size_range: tuple[int, int] | None = None
    layout_jitter: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.layout_jitter <= 1.0:
            raise ValueError(f"layout_jitter must be between 0 and 1, got {self.layout_jitter}")
        if self.image_size < 32:
            raise ValueError(f"image_size must be >= 32 to fit the layout, got {self.image_size}")
        if self.page_size_range is not None:
            if len(self.page_size_range) != 2:
                raise ValueError(f"page_size_range must be (smallest, largest), got {self.page_size_range}")
            self.page_size_range = (int(self.page_size_range[0]), int(self.page_size_range[1]))
            if not 32 <= self.page_size_range[0] <= self.page_size_range[1]:
                raise ValueError(f"page_size_range must be (smallest, largest) with 32 <= smallest <= largest, got "
                                 f"{self.page_size_range}")
        if self.num_train_pages < 1:
            raise ValueError(f"num_train_pages must be >= 1, got {self.num_train_pages}")
        if self.num_negatives < 0:
            raise ValueError(f"num_negatives must be >= 0, got {self.num_negatives}")
        if not 1 <= self.num_eval_queries < len(ALL_COMBOS):
            raise ValueError(f"num_eval_queries must be in [1, {len(ALL_COMBOS) - 1}], got {self.num_eval_queries}")
        if self.distractors_per_query < 0:
            raise ValueError(f"distractors_per_query must be >= 0, got {self.distractors_per_query}")


def config_record(config: SynthConfig) -> dict:
    """The config as ``synth.json`` stores it: plain JSON values, and options added later left out at their default.

    Leaving out ``page_size_range`` when it is None (and ``layout_jitter`` when 0) keeps the record of earlier configs
    unchanged, so a dataset generated before the option existed still matches its config and is not regenerated.
    """
    record = json.loads(json.dumps(asdict(config)))  # tuples become lists, as they are after a round trip
    if record["page_size_range"] is None:
        del record["page_size_range"]
    if record["layout_jitter"] == 0.0:
        del record["layout_jitter"]
    return record


@dataclass(frozen=True)
class PageSpec:
    """A page to render: its topic and the seed of its private RNG."""

    combo: Combo
    seed: int


@dataclass(frozen=True)
class TrainRow:
    """One training example: a query, its positive page and its hard negatives."""

    query: str
    positive: PageSpec
    negatives: tuple[PageSpec, ...]


@dataclass(frozen=True)
class EvalQuery:
    """A held-out query; its combo never occurs in training."""

    id: str
    text: str
    combo: Combo


@dataclass(frozen=True)
class CorpusPage:
    """An eval corpus page and the query it was generated for (as positive or as hard distractor)."""

    id: str
    page: PageSpec
    query_id: str
    relevant: bool


@dataclass(frozen=True)
class SynthPlan:
    """Everything :func:`generate` will write, except pixels."""

    train: tuple[TrainRow, ...]
    queries: tuple[EvalQuery, ...]
    corpus: tuple[CorpusPage, ...]

    def qrels(self) -> list[tuple[str, str, int]]:
        """Returns ``(query_id, corpus_id, score)`` for every relevant pair, sorted by query id."""
        return sorted((p.query_id, p.id, 1) for p in self.corpus if p.relevant)


@dataclass(frozen=True)
class SynthPaths:
    """Locations of the ``save_to_disk`` directories written by :func:`generate`."""

    train: Path
    eval_queries: Path
    eval_corpus: Path
    eval_qrels: Path


# --------------------------------------------------------------------------------------------------------------------
# Planning
# --------------------------------------------------------------------------------------------------------------------


def _sub_rng(seed: int, stream: str) -> random.Random:
    # String seeds are hashed with SHA-512 by `random` (not the per-process salted hash()), so this is reproducible.
    # Separate streams keep the eval split identical when only train-side parameters change.
    return random.Random(f"vdr-synth:{seed}:{stream}")


def _query_text(combo: Combo, rng: random.Random) -> str:
    template = rng.choice(QUERY_TEMPLATES)
    return template.format(company=combo.company, metric=combo.metric.lower(), year=combo.year)


def _replace(combo: Combo, attribute: str, value: str | int) -> Combo:
    return combo._replace(**{attribute: value})


def _neighbours(combo: Combo, attribute: str, forbidden: set[Combo]) -> list[Combo]:
    values: Sequence[str | int] = {"company": COMPANIES, "metric": METRICS, "year": YEARS}[attribute]
    out = []
    for value in values:
        other = _replace(combo, attribute, value)
        if other != combo and other not in forbidden:
            out.append(other)
    return out


def _hard_negatives(combo: Combo, count: int, forbidden: set[Combo], rng: random.Random) -> list[Combo]:
    """Samples ``count`` combos that differ from ``combo`` in exactly one attribute and avoid ``forbidden``.

    The changed attribute rotates through a random permutation so that company, metric and year changes are mixed.
    Combos are distinct where possible; only if the one-attribute neighbourhood is exhausted are combos reused (as
    different renders).
    """
    order = list(_ATTRIBUTES)
    rng.shuffle(order)
    chosen: list[Combo] = []
    for i in range(count):
        used = set(chosen)
        picked = None
        # Prefer the scheduled attribute, then the others, then allow repeats: keeps the mix without ever failing
        # merely because one attribute's neighbourhood is small (e.g. metric has only 7 alternatives).
        for allow_repeat in (False, True):
            for attribute in order[i % 3 :] + order[: i % 3]:
                candidates = [c for c in _neighbours(combo, attribute, forbidden) if allow_repeat or c not in used]
                if candidates:
                    picked = rng.choice(candidates)
                    break
            if picked is not None:
                break
        if picked is None:
            raise ValueError(f"no one-attribute neighbour of {combo} is allowed; lower num_eval_queries")
        chosen.append(picked)
    return chosen


def _page_seed(rng: random.Random) -> int:
    return rng.getrandbits(63)


def plan(config: SynthConfig) -> SynthPlan:
    """Decides combos, query texts, ids and per-page render seeds without rendering anything.

    Args:
        config: Dataset parameters; ``image_size``, ``page_size_range`` and ``blank_query_text`` do not affect the
            plan, so a blanked (or resized) dataset shares ids, queries and qrels with the normal one.

    Returns:
        The full plan. Eval combos are disjoint from every train positive and negative combo, and no distractor has
        an eval query's combo.
    """
    split_rng = _sub_rng(config.seed, "split")
    eval_combos = split_rng.sample(ALL_COMBOS, config.num_eval_queries)
    eval_set = set(eval_combos)
    train_combos = [c for c in ALL_COMBOS if c not in eval_set]

    eval_rng = _sub_rng(config.seed, "eval")
    queries: list[EvalQuery] = []
    unshuffled: list[tuple[PageSpec, str, bool]] = []
    for i, combo in enumerate(eval_combos):
        query = EvalQuery(id=f"q{i:04d}", text=_query_text(combo, eval_rng), combo=combo)
        queries.append(query)
        unshuffled.append((PageSpec(combo, _page_seed(eval_rng)), query.id, True))
        for distractor in _hard_negatives(combo, config.distractors_per_query, eval_set, eval_rng):
            unshuffled.append((PageSpec(distractor, _page_seed(eval_rng)), query.id, False))
    # Shuffled so that corpus position carries no information about relevance.
    eval_rng.shuffle(unshuffled)
    corpus = tuple(
        CorpusPage(id=f"p{i:05d}", page=page, query_id=qid, relevant=rel)
        for i, (page, qid, rel) in enumerate(unshuffled)
    )

    train_rng = _sub_rng(config.seed, "train")
    rows: list[TrainRow] = []
    cycle: list[Combo] = []
    for _ in range(config.num_train_pages):
        if not cycle:
            # Reshuffle every pass so that repeated combos are not at a fixed period in the row order.
            cycle = list(train_combos)
            train_rng.shuffle(cycle)
        combo = cycle.pop()
        text = _query_text(combo, train_rng)
        positive = PageSpec(combo, _page_seed(train_rng))
        negatives = tuple(
            PageSpec(neg, _page_seed(train_rng))
            for neg in _hard_negatives(combo, config.num_negatives, eval_set, train_rng)
        )
        rows.append(TrainRow(query=text, positive=positive, negatives=negatives))

    return SynthPlan(train=tuple(rows), queries=tuple(queries), corpus=corpus)


# --------------------------------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PageLayout:
    """All random decisions of one page. Sampled without access to the topic, which is what keeps pages honest."""

    background: tuple[int, int, int]
    ink: tuple[int, int, int]
    margin_x: int
    margin_y: int
    filler_lines: tuple[str, ...]
    kind: str  # "table" or "chart"
    table: tuple[tuple[int, ...], ...]
    bars: tuple[float, ...]
    bar_colours: tuple[tuple[int, int, int], ...]
    block_x: int


def _scaled(size: int, px128: float) -> int:
    # Layout is designed at 128 px and scaled linearly so that other image sizes look the same.
    return max(1, round(px128 * size / 128))


def _rgb(rng: random.Random, low: int, high: int) -> tuple[int, int, int]:
    return rng.randint(low, high), rng.randint(low, high), rng.randint(low, high)


def _jittered(low: float, high: float, u: float, jitter: float) -> float:
    # jitter 1 is rng.uniform(low, high) itself; 0 is the middle of the range.
    return low + (high - low) * (u if jitter == 1.0 else 0.5 + jitter * (u - 0.5))


def sample_layout(rng: random.Random, size: int = 128, jitter: float = 0.0) -> PageLayout:
    """Draws every random decision of a page from ``rng``.

    Args:
        rng: The page's private RNG; what is drawn never depends on the topic or on blanking.
        size: Page side length in pixels.
        jitter: Scales how far the margins move from page to page (``SynthConfig.layout_jitter``).

    Returns:
        The page layout.
    """
    # Light tint and dark ink keep contrast high whatever the draw, so the text is always readable.
    background = _rgb(rng, 212, 255)
    ink = _rgb(rng, 0, 70)
    margin_x = _scaled(size, _jittered(4, 10, rng.random(), jitter))
    margin_y = _scaled(size, _jittered(2, 7, rng.random(), jitter))
    num_lines = rng.randint(2, 3)
    filler_lines = tuple(" ".join(rng.choice(FILLER_WORDS) for _ in range(rng.randint(2, 4))) for _ in range(num_lines))
    kind = rng.choice(("table", "chart"))
    rows, cols = rng.randint(2, 3), rng.randint(3, 4)
    table = tuple(tuple(rng.randint(10, 999) for _ in range(cols)) for _ in range(rows))
    num_bars = rng.randint(4, 8)
    bars = tuple(rng.uniform(0.15, 1.0) for _ in range(num_bars))
    # Either one colour for all bars or one per bar.
    bar_colours = tuple(_rgb(rng, 30, 200) for _ in range(rng.choice((1, num_bars))))
    block_x = _scaled(size, rng.uniform(0, 14))
    return PageLayout(
        background=background,
        ink=ink,
        margin_x=margin_x,
        margin_y=margin_y,
        filler_lines=filler_lines,
        kind=kind,
        table=table,
        bars=bars,
        bar_colours=bar_colours,
        block_x=block_x,
    )


@lru_cache(maxsize=64)
def _font(size: int) -> ImageFont.FreeTypeFont:
    # Pillow's bundled Aileron via FreeType: no font files needed, identical glyphs everywhere Pillow runs.
    return ImageFont.load_default(size=size)  # type: ignore[return-value]


def _fitting_font(text: str, size: int, max_width: int) -> ImageFont.FreeTypeFont:
    # Shrinks only as far as needed, so long names stay as large (legible) as the page allows; never past its room
    # (on the smallest pages the metric would otherwise run into the year).
    for pt in range(size, 1, -1):
        font = _font(pt)
        if font.getlength(text) <= max_width:
            return font
    return _font(1)


def _draw_table(draw: ImageDraw.ImageDraw, layout: PageLayout, box: tuple[int, int, int, int], size: int) -> None:
    x0, y0, x1, y1 = box
    rows, cols = len(layout.table), len(layout.table[0])
    row_h = min(_scaled(size, 12), (y1 - y0) // rows)
    col_w = (x1 - x0) // cols
    font = _font(_scaled(size, 9))
    for r, values in enumerate(layout.table):
        for c, value in enumerate(values):
            cx, cy = x0 + c * col_w, y0 + r * row_h
            draw.rectangle((cx, cy, cx + col_w, cy + row_h), outline=layout.ink)
            draw.text((cx + _scaled(size, 2), cy + _scaled(size, 1)), str(value), fill=layout.ink, font=font)


def _draw_chart(draw: ImageDraw.ImageDraw, layout: PageLayout, box: tuple[int, int, int, int]) -> None:
    x0, y0, x1, y1 = box
    draw.line((x0, y1, x1, y1), fill=layout.ink)
    draw.line((x0, y0, x0, y1), fill=layout.ink)
    slot = (x1 - x0 - 2) / len(layout.bars)
    for i, height in enumerate(layout.bars):
        left = x0 + 2 + i * slot
        top = y1 - 1 - height * (y1 - y0 - 2)
        colour = layout.bar_colours[i % len(layout.bar_colours)]
        draw.rectangle((round(left + slot * 0.15), round(top), round(left + slot * 0.85), y1 - 1), fill=colour)


def render_page(
    company: str,
    metric: str,
    year: int,
    rng: random.Random,
    *,
    size: int = 128,
    blank_query_text: bool = False,
    layout_jitter: float = 0.0,
) -> Image.Image:
    """Renders one report page.

    Args:
        company: Title text.
        metric: Left of the subtitle.
        year: Right of the subtitle, aligned to the right margin.
        rng: Source of every other decision on the page; consumed identically whatever the topic or blanking.
        size: Side length in pixels.
        blank_query_text: Skip drawing title and subtitle; the rest of the page is pixel-identical.
        layout_jitter: See ``SynthConfig.layout_jitter``.

    Returns:
        An RGB image of ``size`` x ``size`` pixels.
    """
    layout = sample_layout(rng, size, layout_jitter)
    image = Image.new("RGB", (size, size), layout.background)
    draw = ImageDraw.Draw(image)
    width = size - 2 * layout.margin_x
    band = int(QUERY_TEXT_BAND * size)

    # Fixed slot heights (not the fitted font heights) place everything below the band, so neither the title's
    # length nor blanking can move the rest of the page.
    title_slot, subtitle_slot = _scaled(size, 27), _scaled(size, 17)
    if not blank_query_text:
        title_font = _fitting_font(company, _scaled(size, 24), width)
        draw.text((layout.margin_x, layout.margin_y), company, fill=layout.ink, font=title_font, anchor="lt")
        # The year keeps its place at the right margin whatever the metric's length (digits share one width).
        subtitle_y = layout.margin_y + title_slot
        year_text, year_font = str(year), _font(_scaled(size, 14))
        draw.text((size - layout.margin_x, subtitle_y), year_text, fill=layout.ink, font=year_font, anchor="rt")
        metric_width = width - round(year_font.getlength(year_text)) - _scaled(size, 4)
        metric_font = _fitting_font(metric, _scaled(size, 14), metric_width)
        draw.text((layout.margin_x, subtitle_y), metric, fill=layout.ink, font=metric_font, anchor="lt")
    assert layout.margin_y + title_slot + subtitle_slot <= band, "query text must stay inside its band"

    y = band + _scaled(size, 2)
    filler_font = _font(_scaled(size, 9))
    line_h = _scaled(size, 11)
    for line in layout.filler_lines:
        # Drop trailing words that would run off the page; depends only on the sampled words, never on the topic.
        words = line.split()
        while len(words) > 1 and filler_font.getlength(" ".join(words)) > width:
            words.pop()
        draw.text((layout.margin_x, y), " ".join(words), fill=layout.ink, font=filler_font, anchor="lt")
        y += line_h

    bottom = size - _scaled(size, 4)
    box = (layout.margin_x + layout.block_x, y + _scaled(size, 2), size - layout.margin_x, bottom)
    if layout.kind == "table":
        _draw_table(draw, layout, box, size)
    else:
        _draw_chart(draw, layout, box)
    return image


def page_size(spec: PageSpec, size_range: tuple[int, int]) -> int:
    """The side length of a planned page whose size varies: drawn from a stream of its own (not the layout's RNG)."""
    return random.Random(f"vdr-synth:page-size:{spec.seed}").randint(*size_range)


def render_spec(
    spec: PageSpec,
    *,
    size: int,
    blank_query_text: bool,
    size_range: tuple[int, int] | None = None,
    layout_jitter: float = 0.0,
) -> Image.Image:
    """Renders a planned page with its own seeded RNG.

    Args:
        spec: Topic and render seed.
        size: Side length in pixels.
        blank_query_text: Skip title and subtitle.
        size_range: When set, the side length is drawn from this range with :func:`page_size` instead of ``size``.
        layout_jitter: See ``SynthConfig.layout_jitter``.

    Returns:
        The page image.
    """
    company, metric, year = spec.combo
    if size_range is not None:
        size = page_size(spec, size_range)
    return render_page(company, metric, year, random.Random(spec.seed), size=size, blank_query_text=blank_query_text,
                       layout_jitter=layout_jitter)


# --------------------------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------------------------

def generate(
    output_dir: str | os.PathLike, config: SynthConfig, *, progress: bool = True, overwrite: bool = False
) -> SynthPaths:
    """Renders the planned dataset and saves it with ``datasets.save_to_disk``.

    Layout under ``output_dir``: ``train`` (query, image, negative_0..k-1), ``eval/queries`` (id, text),
    ``eval/corpus`` (id, image), ``eval/qrels`` (query_id, corpus_id, score) and ``synth.json``. Everything is built in
    the sibling ``<output_dir>.tmp-<pid>`` and renamed into place at the end.

    Args:
        output_dir: Destination directory; must be absent or empty unless ``overwrite``.
        config: Dataset parameters.
        progress: Show a tqdm bar over rendered pages.
        overwrite: Replace an existing non-empty ``output_dir``.

    Returns:
        Paths of the four saved datasets (at their final location).

    Raises:
        FileExistsError: ``output_dir`` exists, is non-empty and ``overwrite`` is false.
    """
    import datasets
    from tqdm.auto import tqdm

    output_dir = Path(output_dir)
    check_target(output_dir, overwrite)
    the_plan = plan(config)
    size, blank, size_range = config.image_size, config.blank_query_text, config.page_size_range
    k = config.num_negatives
    total_pages = len(the_plan.train) * (1 + k) + len(the_plan.corpus)

    tmp_dir = temporary_sibling(output_dir)
    try:
        with tqdm(total=total_pages, desc="synth pages", unit="page", disable=not progress) as bar:

            def render(spec: PageSpec) -> Image.Image:
                bar.update(1)
                return render_spec(spec, size=size, blank_query_text=blank, size_range=size_range,
                                   layout_jitter=config.layout_jitter)

            def train_rows() -> Iterator[dict]:
                for row in the_plan.train:
                    record = {"query": row.query, "image": render(row.positive)}
                    for i, neg in enumerate(row.negatives):
                        record[f"negative_{i}"] = render(neg)
                    yield record

            def corpus_rows() -> Iterator[dict]:
                for page in the_plan.corpus:
                    yield {"id": page.id, "image": render(page.page)}

            train_features = datasets.Features(
                {"query": datasets.Value("string"), "image": datasets.Image()}
                | {f"negative_{i}": datasets.Image() for i in range(k)}
            )
            write_dataset(train_rows(), train_features, tmp_dir / "train")
            write_dataset(
                corpus_rows(),
                datasets.Features({"id": datasets.Value("string"), "image": datasets.Image()}),
                tmp_dir / "eval" / "corpus",
            )

        write_dataset(
            iter({"id": q.id, "text": q.text} for q in the_plan.queries),
            datasets.Features({"id": datasets.Value("string"), "text": datasets.Value("string")}),
            tmp_dir / "eval" / "queries",
        )
        qrels = the_plan.qrels()
        write_dataset(
            iter({"query_id": q, "corpus_id": c, "score": s} for q, c, s in qrels),
            datasets.Features(
                {
                    "query_id": datasets.Value("string"),
                    "corpus_id": datasets.Value("string"),
                    "score": datasets.Value("int64"),
                }
            ),
            tmp_dir / "eval" / "qrels",
        )
        train_combos = {row.positive.combo for row in the_plan.train}
        meta = {
            "generator_version": GENERATOR_VERSION,
            "config": config_record(config),
            "counts": {
                "train_rows": len(the_plan.train),
                "train_combos": len(train_combos),
                "negatives_per_row": k,
                "eval_queries": len(the_plan.queries),
                "corpus_pages": len(the_plan.corpus),
                "qrels": len(qrels),
                "rendered_pages": total_pages,
            },
        }
        (tmp_dir / "synth.json").write_text(json.dumps(meta, indent=2) + "\n")
        move_into_place(tmp_dir, output_dir)
    except BaseException:
        # Includes KeyboardInterrupt: an interrupted run leaves neither a partial output_dir nor a stray temp dir.
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise

    return SynthPaths(
        train=output_dir / "train",
        eval_queries=output_dir / "eval" / "queries",
        eval_corpus=output_dir / "eval" / "corpus",
        eval_qrels=output_dir / "eval" / "qrels",
    )


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point (``vdr data synth``).

    Args:
        argv: Arguments without the program name; ``sys.argv[1:]`` when None.

    Returns:
        Process exit code.
    """
    defaults = SynthConfig()
    parser = argparse.ArgumentParser(prog="vdr data synth", description="Generate the synthetic VDR dataset.")
    parser.add_argument("--output", required=True, help="destination directory")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--image-size", type=int, default=defaults.image_size)
    parser.add_argument("--num-train-pages", type=int, default=defaults.num_train_pages)
    parser.add_argument("--num-negatives", type=int, default=defaults.num_negatives)
    parser.add_argument("--num-eval-queries", type=int, default=defaults.num_eval_queries)
    parser.add_argument("--distractors-per-query", type=int, default=defaults.distractors_per_query)
    parser.add_argument("--blank-query-text", action="store_true", help="omit title and subtitle from every page")
    parser.add_argument("--page-size-range", type=int, nargs=2, metavar=("SMALLEST", "LARGEST"),
                        help="draw each page's side from this range instead of --image-size")
    parser.add_argument("--layout-jitter", type=float, default=defaults.layout_jitter,
                        help="how far margins and title move from page to page: 0 (fixed) to 1 (generator version 1's "
                             "margin range)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = parser.parse_args(argv)

    try:  # SynthConfig's own checks, reported as usage errors like argparse's
        config = SynthConfig(
            seed=args.seed,
            image_size=args.image_size,
            num_train_pages=args.num_train_pages,
            num_negatives=args.num_negatives,
            num_eval_queries=args.num_eval_queries,
            distractors_per_query=args.distractors_per_query,
            blank_query_text=args.blank_query_text,
            page_size_range=tuple(args.page_size_range) if args.page_size_range else None,
            layout_jitter=args.layout_jitter,
        )
    except ValueError as err:
        parser.error(str(err))
    start = time.perf_counter()
    try:
        generate(args.output, config, progress=not args.no_progress, overwrite=args.overwrite)
    except FileExistsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    n_corpus = config.num_eval_queries * (1 + config.distractors_per_query)
    print(
        f"synth: wrote {config.num_train_pages} train rows ({config.num_negatives} negatives each), "
        f"{config.num_eval_queries} eval queries, {n_corpus} corpus pages to {args.output} "
        f"in {time.perf_counter() - start:.1f}s (seed {config.seed}, blank_query_text={config.blank_query_text})"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
