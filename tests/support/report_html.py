"""Reading back `podtally report --format html`: table cells by section, SVG elements."""

from __future__ import annotations

from html.parser import HTMLParser


class PageParser(HTMLParser):
    """Cells by section of the table `table_id` (the report's rows), every table's cells by
    id, and the SVG elements of the page with their attributes, by chart."""

    def __init__(self, table_id: str = "rows") -> None:
        super().__init__()
        self.table_id = table_id
        self.rows: dict[str, list[list[str]]] = {"thead": [], "tbody": [], "tfoot": []}
        self.tables: dict[str, list[list[str]]] = {}
        self.table = ""
        self.section = ""
        self.cell: list[str] | None = None
        self.svgs = 0
        self.rects = 0
        self.chart = ""
        self.chart_rects: dict[str, list[dict[str, str]]] = {}
        self.tags: set[str] = set()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.add(tag)
        a = {k: v or "" for k, v in attrs}
        if tag == "table":
            self.table = a.get("id", "")
            self.tables[self.table] = []
        elif tag in self.rows:
            self.section = tag
        elif tag == "tr":
            self.tables[self.table].append([])
            if self.table == self.table_id:
                self.rows[self.section].append([])
        elif tag in ("td", "th"):
            self.cell = []
        elif tag == "svg":
            self.svgs += 1
            self.chart = a.get("id", "")
            self.chart_rects.setdefault(self.chart, [])
        elif tag == "rect":
            self.rects += 1
            self.chart_rects[self.chart].append(a)

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self.cell is not None:
            text = "".join(self.cell)
            self.tables[self.table][-1].append(text)
            if self.table == self.table_id:
                self.rows[self.section][-1].append(text)
            self.cell = None

    def handle_data(self, data: str) -> None:
        if self.cell is not None:
            self.cell.append(data)
