"""A report as sections of paragraphs, tables, token strips and figures, written twice.

``Report.write_html`` gives one self-contained file (figures embedded as base64 PNG, no
external style or script, so it opens offline); ``Report.write_markdown`` gives the same
content with the figures linked as PNG files beside it.
"""

from __future__ import annotations

import base64
import html
import re
from dataclasses import dataclass, field
from pathlib import Path

from matplotlib.figure import Figure


def code_span(text: str) -> str:
    """``text`` as a Markdown code span whatever backticks it holds (SST-2 has "``" and "`"):
    fenced by one backtick more than its longest run of them, with a space inside the fences
    where it starts or ends with one (CommonMark strips that space)."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * (longest + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


@dataclass
class Table:
    """A header row and body rows of already formatted cells."""

    header: list[str]
    rows: list[list[str]]


@dataclass
class Tokens:
    """A token strip: each token shaded by a weight in [0, 1] and optionally marked."""

    tokens: list[str]
    weights: list[float] | None = None
    marked: list[bool] | None = None  # e.g. unknown tokens, drawn with a dashed border
    caption: str = ""


@dataclass
class Picture:
    """A figure saved as ``name`` beside the report."""

    name: str
    caption: str


Block = str | Table | Tokens | Picture


@dataclass
class Section:
    title: str
    blocks: list[Block] = field(default_factory=list)


_STYLE = """
body { font-family: sans-serif; max-width: 72rem; margin: 2rem auto; padding: 0 1rem; color: #111; }
table { border-collapse: collapse; margin: 0.8rem 0; font-size: 0.9rem; }
th, td { border: 1px solid #888; padding: 0.25rem 0.6rem; text-align: left; vertical-align: top; }
th { background: #ddd; }
figure { margin: 1rem 0; } figure img { max-width: 100%; border: 1px solid #ccc; }
figcaption { font-size: 0.85rem; color: #333; }
.tok { display: inline-block; margin: 2px; padding: 1px 4px; border: 1px solid #555;
       border-radius: 3px; font-family: monospace; }
.unk { border: 2px dashed #000; font-weight: bold; }
code, pre { background: #f2f2f2; }
"""


class Report:
    """Sections in order, with the figures they show.

    Args:
        title: The report's title.
        out_dir: Where the report, its figures and its data are written.
    """

    def __init__(self, title: str, out_dir: Path) -> None:
        self.title = title
        self.out_dir = out_dir
        self.sections: list[Section] = []
        out_dir.mkdir(parents=True, exist_ok=True)

    def section(self, title: str) -> Section:
        self.sections.append(Section(title))
        return self.sections[-1]

    def figure(self, section: Section, figure: Figure, name: str, caption: str) -> None:
        """Save ``figure`` as ``name`` (a .png) and show it in ``section``."""
        figure.savefig(self.out_dir / name, dpi=110, bbox_inches="tight")
        section.blocks.append(Picture(name, caption))

    def write_html(self, name: str = "report.html") -> Path:
        title = html.escape(self.title)
        parts = [
            (
                f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{title}</title>"
                f"<style>{_STYLE}</style></head><body><h1>{title}</h1>"
            )
        ]
        for section in self.sections:
            parts.append(f"<h2>{html.escape(section.title)}</h2>")
            parts.extend(self._html_block(block) for block in section.blocks)
        parts.append("</body></html>")
        path = self.out_dir / name
        path.write_text("\n".join(parts), encoding="utf-8")
        return path

    def _html_block(self, block: Block) -> str:
        if isinstance(block, str):
            return f"<p>{html.escape(block)}</p>"
        if isinstance(block, Table):
            head = "".join(f"<th>{html.escape(c)}</th>" for c in block.header)
            body = "".join(
                "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>"
                for row in block.rows
            )
            return f"<table><tr>{head}</tr>{body}</table>"
        if isinstance(block, Tokens):
            spans = []
            for i, token in enumerate(block.tokens):
                style, title = "", ""
                if block.weights is not None:
                    w = block.weights[i]
                    grey = round(255 * (1 - w))  # darker = more weight, in colour and in print
                    ink = "#fff" if w > 0.5 else "#000"
                    style = f" style='background: rgb({grey},{grey},{grey}); color: {ink}'"
                    title = f" title='{w:.3f}'"
                css = "tok unk" if block.marked and block.marked[i] else "tok"
                spans.append(f"<span class='{css}'{style}{title}>{html.escape(token)}</span>")
            caption = (
                f"<figcaption>{html.escape(block.caption)}</figcaption>" if block.caption else ""
            )
            return f"<figure><div>{''.join(spans)}</div>{caption}</figure>"
        data = base64.b64encode((self.out_dir / block.name).read_bytes()).decode("ascii")
        return (
            f"<figure><img alt='{html.escape(block.caption)}' src='data:image/png;base64,{data}'>"
            f"<figcaption>{html.escape(block.caption)}</figcaption></figure>"
        )

    def write_markdown(self, name: str = "report.md") -> Path:
        lines = [f"# {self.title}", ""]
        for section in self.sections:
            lines += [f"## {section.title}", ""]
            for block in section.blocks:
                lines += [*self._markdown_block(block), ""]
        path = self.out_dir / name
        path.write_text("\n".join(lines), encoding="utf-8")
        return path

    @staticmethod
    def _markdown_block(block: Block) -> list[str]:
        if isinstance(block, str):
            return [block]
        if isinstance(block, Table):
            cell = lambda c: c.replace("|", "\\|")
            return [
                "| " + " | ".join(map(cell, block.header)) + " |",
                "|" + "---|" * len(block.header),
                *("| " + " | ".join(map(cell, row)) + " |" for row in block.rows),
            ]
        if isinstance(block, Tokens):
            shown = []
            for i, token in enumerate(block.tokens):
                text = code_span(token)
                if block.weights is not None:
                    text += f"<sub>{block.weights[i]:.2f}</sub>"
                if block.marked and block.marked[i]:
                    text = f"**{text}**"
                shown.append(text)
            return [" ".join(shown)] + ([f"*{block.caption}*"] if block.caption else [])
        return [f"![{block.caption}]({block.name})", f"*{block.caption}*"]
