"""Reading back `podtally report --format html`: table cells by section, SVG elements."""

from __future__ import annotations

from html.parser import HTMLParser


class PageParser(HTMLParser):
    """Table cells by section, and the SVG elements of the page."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: dict[str, list[list[str]]] = {"thead": [], "tbody": [], "tfoot": []}
        self.section = ""
        self.cell: list[str] | None = None
        self.svgs = 0
        self.rects = 0
        self.tags: set[str] = set()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.add(tag)
        if tag in self.rows:
            self.section = tag
        elif tag == "tr":
            self.rows[self.section].append([])
        elif tag in ("td", "th"):
            self.cell = []
        elif tag == "svg":
            self.svgs += 1
        elif tag == "rect":
            self.rects += 1

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self.cell is not None:
            self.rows[self.section][-1].append("".join(self.cell))
            self.cell = None

    def handle_data(self, data: str) -> None:
        if self.cell is not None:
            self.cell.append(data)
