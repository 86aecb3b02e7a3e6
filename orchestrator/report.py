"""`report MANIFEST`: one self-contained HTML page to review a campaign.

The campaign table (failures highlighted, with their reasons), a gallery of each image
job's pictures (thumbnails linking to the files on disk) and each training job's
checkpoints with sizes and hashes. Everything comes from the state store and the
output folder; links are relative, so the folder can be moved or shared whole.
"""

from __future__ import annotations

import html
import time
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import quote

from .models import BAD_ENDINGS, ArtifactKind, JobState
from .output import write_atomic
from .store import FileRow, JobRow
from .ui import human_bytes

CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:2rem;color:#1d232a;background:#fafbfc}
h1{font-size:1.4rem;margin:0 0 .2rem} h2{font-size:1.1rem;margin:2rem 0 .6rem}
.meta{color:#5b6570;margin-bottom:1rem} .counts span{display:inline-block;margin:0 .8rem .4rem 0}
table{border-collapse:collapse;width:100%;background:#fff} td,th{padding:.35rem .6rem;border-bottom:1px solid #e3e7eb;
text-align:left;vertical-align:top} th{background:#f1f3f5} tr.bad td{background:#fdecec} tr.bad .state{color:#b3261e;
font-weight:600} tr.done .state{color:#1b7f3b} .reason{color:#b3261e} code{font-size:12px;word-break:break-all}
.gallery{display:flex;flex-wrap:wrap;gap:.6rem}
.gallery a{display:block;border:1px solid #d7dde3;background:#fff;padding:3px}
.gallery img{display:block;width:160px;height:160px;object-fit:cover;image-rendering:auto}
.job{margin-bottom:1.4rem} .job h3{font-size:1rem;margin:.2rem 0 .4rem}
"""
LOAD_CHECK = """
<script>
// Marks each picture once loaded, so a reviewer (or a test) can see that every one shows.
document.querySelectorAll('img').forEach(function (img) {
  function mark() { img.dataset.loaded = img.naturalWidth > 0 ? 'yes' : 'no'; }
  if (img.complete) { mark(); } else { img.addEventListener('load', mark); img.addEventListener('error', mark); }
});
window.addEventListener('load', function () {
  var imgs = document.querySelectorAll('img'), ok = 0;
  imgs.forEach(function (i) { if (i.naturalWidth > 0) { ok++; } });
  document.body.dataset.images = ok + '/' + imgs.length;
});
</script>
"""


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _href(job_id: str, name: str) -> str:
    return f"{quote(job_id)}/{quote(name)}"


def render(campaign: str, rows: Sequence[JobRow], files: dict[str, list[FileRow]], out_dir: Path | str) -> str:
    counts: dict[str, int] = {}
    for r in rows:
        counts[r.state.value] = counts.get(r.state.value, 0) + 1
    stamp = time.strftime("%Y-%m-%d %H:%M", time.localtime())
    parts = [
        "<!doctype html><html lang=en><head><meta charset=utf-8>",
        f"<title>{_e(campaign)}: dreamlook-batch report</title><style>{CSS}</style></head><body>",
        f"<h1>Campaign {_e(campaign)}</h1><div class=meta>{len(rows)} jobs, report of {stamp}, files in "
        f"<code>{_e(out_dir)}</code></div>",
        "<div class=counts>"
        + "".join(f"<span><b>{n}</b> {_e(s)}</span>" for s, n in sorted(counts.items()))
        + "</div>",
        "<h2>Jobs</h2><table id=jobs><thead><tr><th>job</th><th>type</th><th>state</th><th>remote id</th>"
        "<th>files</th><th>reason</th></tr></thead><tbody>",
    ]
    for r in sorted(rows, key=lambda r: (r.state not in BAD_ENDINGS, r.id)):  # failures first
        fs = files.get(r.id, [])
        css = "bad" if r.state in BAD_ENDINGS else "done" if r.state is JobState.DONE else ""
        parts.append(
            f"<tr class='{css}' data-job='{_e(r.id)}' data-state='{_e(r.state.value)}'>"
            f"<td>{_e(r.id)}</td><td>{_e(r.type)}</td><td class=state>{_e(r.state.value)}</td>"
            f"<td><code>{_e(r.remote_id or '')}</code></td><td>{sum(f.done for f in fs)}/{len(fs)}</td>"
            f"<td class=reason>{_e(r.reason or '')}</td></tr>"
        )
    parts.append("</tbody></table>")
    galleries = [r for r in rows if any(f.kind is ArtifactKind.IMAGE and f.done for f in files.get(r.id, []))]
    if galleries:
        parts.append("<h2>Images</h2>")
        for r in galleries:
            parts.append(f"<div class=job data-gallery='{_e(r.id)}'><h3>{_e(r.id)}</h3><div class=gallery>")
            for f in files[r.id]:
                if f.kind is ArtifactKind.IMAGE and f.done:
                    link = _href(r.id, f.name)
                    parts.append(f"<a href='{link}'><img src='{link}' alt='{_e(f.name)}' loading=eager></a>")
            parts.append("</div></div>")
    trained = [r for r in rows if any(f.kind is not ArtifactKind.IMAGE for f in files.get(r.id, []))]
    if trained:
        parts.append(
            "<h2>Checkpoints</h2><table id=checkpoints><thead><tr><th>job</th><th>file</th><th>kind</th>"
            "<th>size</th><th>sha256</th></tr></thead><tbody>"
        )
        for r in trained:
            for f in files[r.id]:
                if f.kind is ArtifactKind.IMAGE:
                    continue
                name = f"<a href='{_href(r.id, f.name)}'>{_e(f.name)}</a>" if f.done else _e(f.name)
                state = "" if f.done else " (lost)" if f.lost else " (not downloaded)"
                parts.append(
                    f"<tr><td>{_e(r.id)}</td><td>{name}{state}</td><td>{_e(f.kind.value)}</td>"
                    f"<td>{human_bytes(f.size_bytes or 0)}</td><td><code>{_e(f.sha256 or '')}</code></td></tr>"
                )
        parts.append("</tbody></table>")
    parts.append(LOAD_CHECK + "</body></html>\n")
    return "\n".join(parts)


def write_report(campaign: str, rows: Sequence[JobRow], files: dict[str, list[FileRow]], out_dir: Path) -> Path:
    path = out_dir / "report.html"
    write_atomic(path, render(campaign, rows, files, out_dir))
    return path
