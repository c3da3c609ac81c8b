"""The study's HTML report: one self-contained ``report.html`` with its figures embedded.

It shows the study at a glance: test metrics, ROC, where each method looks,
the male-vs-female difference, region rankings, ground-truth scores, method
agreement and sanity checks. :mod:`study.output.publish` fills it in.
"""

from __future__ import annotations

import base64
import html
import io
from dataclasses import dataclass, field
from datetime import UTC, datetime

import pandas as pd
from matplotlib.figure import Figure


def png_bytes(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return buffer.getvalue()


@dataclass
class Report:
    """The parts of the HTML report, filled in as the study goes."""

    title: str
    summary: list[tuple[str, str]] = field(default_factory=list)  # (label, value)
    banner: tuple[str, str] | None = None  # (finding | warning, the verdict in plain words), shown first
    sections: list[tuple[str, str]] = field(default_factory=list)  # (heading, HTML body)

    def add_table(self, heading: str, table: pd.DataFrame, note: str = "") -> None:
        body = (f"<p>{html.escape(note)}</p>" if note else "") + table.to_html(
            index=False, float_format=lambda v: f"{v:.3f}", border=0, classes="table"
        )
        self.sections.append((heading, body))

    def add_images(self, heading: str, images: list[tuple[str, Figure]], note: str = "") -> None:
        figures = "".join(
            f'<figure><img src="data:image/png;base64,{base64.b64encode(png_bytes(figure)).decode()}" '
            f'alt="{html.escape(caption)}"><figcaption>{html.escape(caption)}</figcaption></figure>'
            for caption, figure in images
        )
        self.sections.append(
            (heading, (f"<p>{html.escape(note)}</p>" if note else "") + f'<div class="figs">{figures}</div>')
        )

    def add_html(self, heading: str, body: str, note: str = "") -> None:
        """A section of ready HTML (the maps' viewer), under a note."""
        self.sections.append((heading, (f"<p>{html.escape(note)}</p>" if note else "") + body))

    def html(self) -> str:
        summary = "".join(f"<div><span>{html.escape(k)}</span><b>{html.escape(v)}</b></div>" for k, v in self.summary)
        banner = f'<div class="banner {self.banner[0]}">{html.escape(self.banner[1])}</div>' if self.banner else ""
        toc = "".join(f'<a href="#s{i}">{html.escape(h)}</a>' for i, (h, _) in enumerate(self.sections))
        body = "".join(
            f'<section id="s{i}"><h2>{html.escape(h)}</h2>{b}</section>' for i, (h, b) in enumerate(self.sections)
        )
        made = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
        return f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(self.title)}</title>
<style>
body{{font-family:system-ui,sans-serif;margin:0;color:#1d2330;background:#f6f7f9}}
header{{background:#1d2330;color:#fff;padding:18px 28px}} header h1{{margin:0;font-size:22px}}
header p{{margin:4px 0 0;color:#b8c0d0;font-size:13px}}
nav{{padding:8px 28px;background:#e9ecf2;font-size:13px}} nav a{{margin-right:16px;color:#2a4d9b}}
.banner{{margin:14px 28px 0;padding:12px 18px;border-radius:6px;font-size:15px;font-weight:600}}
.banner.warning{{background:#fdecea;color:#8a1c12;border:1px solid #f5c2bd}}
.banner.finding{{background:#e8f4ea;color:#1d5b2a;border:1px solid #bfe0c6}}
.summary{{display:flex;flex-wrap:wrap;gap:10px;padding:16px 28px}}
.summary div{{background:#fff;border-radius:6px;padding:10px 14px;box-shadow:0 1px 2px #0002}}
.summary span{{display:block;font-size:12px;color:#5a6478}} .summary b{{font-size:18px}}
section{{overflow-x:auto;background:#fff;margin:14px 28px;padding:14px 20px;border-radius:6px;
 box-shadow:0 1px 2px #0002}}
h2{{font-size:17px;margin:4px 0 10px}} p{{font-size:13px;color:#3a4356;max-width:70em}}
.table{{border-collapse:collapse;font-size:13px}}
.table th,.table td{{padding:4px 10px;border-bottom:1px solid #e3e6ec;text-align:right}}
.table th{{background:#f0f2f6}} .table td:first-child,.table th:first-child{{text-align:left}}
.figs{{display:flex;flex-wrap:wrap;gap:12px}} figure{{margin:0;width:620px;max-width:100%}}
figure img{{width:100%;border:1px solid #e3e6ec}}
figcaption{{font-size:12px;color:#5a6478}}
.viewer-controls{{display:flex;flex-wrap:wrap;gap:18px;align-items:center;font-size:13px}}
.viewer-controls select{{max-width:36em}} .viewer-scale{{color:#5a6478;display:flex;gap:6px;align-items:center}}
.viewer-slices{{display:flex;gap:6px;margin-top:10px}}
.viewer-slices canvas{{background:#000;cursor:crosshair;max-width:calc((100% - 12px) / 3);height:auto}}
.viewer-readout{{font-family:ui-monospace,monospace;font-size:13px;color:#1d2330}}
</style></head><body>
<header><h1>{html.escape(self.title)}</h1><p>made {made} by study</p></header>
<nav>{toc}</nav>{banner}<div class="summary">{summary}</div>{body}</body></html>"""
