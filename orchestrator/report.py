"""`report MANIFEST`: one self-contained HTML page to review a campaign.

The campaign table (failures highlighted, with their reasons; jobs removed from the
manifest after they were paid for listed after the others, marked), a gallery of each
image job's pictures (thumbnails linking to the files on disk, each with its prompt and
seed) and each training job's checkpoints with their base model, steps, sizes and hashes.
Everything comes from the state store (what each job was sent with) and the output folder
(`job.json`: which prompt each picture answers and the seed it was made with); links are
relative, so the folder can be moved or shared whole. Every text is escaped.
"""

from __future__ import annotations

import contextlib
import html
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

from .models import BAD_ENDINGS, ArtifactKind, JobState
from .output import NOT_IN_MANIFEST, write_atomic
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
.gallery figure{margin:0;width:168px} .gallery figcaption{font-size:12px;color:#3d4650;margin-top:.2rem;
overflow-wrap:anywhere} .seed{color:#5b6570} tr.removed td{color:#5b6570} .mark{font-style:italic}
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


@dataclass(frozen=True, slots=True)
class Made:
    """What a job was sent with, and what its job object says of each file (by remote id)."""

    config: Mapping[str, Any]  # the submitted body (the store's), else the job object's echo of it
    images: Mapping[str, tuple[int | None, int | None]]  # image id -> (config_idx, seed)
    steps: Mapping[str, int]  # checkpoint id -> its training_step

    @classmethod
    def of(cls, row: JobRow, out_dir: Path | str) -> Made:
        job: Any = {}
        if isinstance(out_dir, Path):  # a bucket's job.json is not read back: the store's record serves
            with contextlib.suppress(OSError, ValueError):
                job = json.loads((out_dir / row.id / "job.json").read_text(encoding="utf-8"))
        job = job if isinstance(job, dict) else {}
        config: Any = None
        with contextlib.suppress(TypeError, ValueError):
            config = json.loads(row.sent_payload) if row.sent_payload else None
        if not isinstance(config, dict):  # adopted from the service: only its echo is known
            config = job.get("config") if isinstance(job.get("config"), dict) else {}
        images: dict[str, tuple[int | None, int | None]] = {}
        for group in _dicts(job.get("image_gen_results")):
            for image in _dicts(group.get("generated_images")):
                # keyed as the store keys the file (api/jobs.py): its id, else the name in its URL
                key = image.get("generated_image_id") or urlsplit(str(image.get("url", ""))).path.rsplit("/", 1)[-1]
                images[str(key)] = (_int(group.get("config_idx")), _int(image.get("seed")))
        result = job.get("dreambooth_result")
        checkpoints = _dicts(result.get("checkpoints")) if isinstance(result, dict) else []
        steps = {str(c.get("checkpoint_id")): step for c in checkpoints if (step := _int(c.get("training_step")))}
        return cls(config, images, steps)

    def caption(self, image_id: str) -> tuple[str | None, int | None]:
        """The prompt a picture answers and the seed it was made with, as far as they are known."""
        configs = _dicts(self.config.get("image_gen")) if "image_gen" in self.config else [self.config]
        index, seed = self.images.get(image_id, (None, None))
        if index is None and len(configs) == 1:
            index = 0
        chosen = configs[index] if index is not None and 0 <= index < len(configs) else {}
        prompt = chosen.get("prompt")
        asked = _int(chosen.get("seed"))
        if seed is None and asked is not None and asked >= 0:  # -1 asks for a random one
            seed = asked
        return (prompt if isinstance(prompt, str) else None), seed

    def training(self, row: JobRow) -> tuple[str, str]:
        """Base model (or the checkpoint it went on from) and steps, as the checkpoint table shows them."""
        section = self.config.get("dreambooth")
        trained = section if isinstance(section, dict) else self.config
        base = trained.get("base_model")
        if not isinstance(base, str):
            base = f"checkpoint of {row.checkpoint_from}" if row.checkpoint_from else ""
        steps = trained.get("steps")
        return base, str(steps) if isinstance(steps, int) and not isinstance(steps, bool) else ""


def _dicts(value: Any) -> list[Mapping[str, Any]]:
    return [v for v in value if isinstance(v, dict)] if isinstance(value, list) else []


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def render(campaign: str, rows: Sequence[JobRow], files: dict[str, list[FileRow]], out_dir: Path | str) -> str:
    counts: dict[str, int] = {}
    removed: dict[str, int] = {}  # counted apart: no longer asked for, still paid for
    for r in rows:
        tally = counts if r.in_manifest else removed
        tally[r.state.value] = tally.get(r.state.value, 0) + 1
    apart = (
        f"; {sum(removed.values())} {NOT_IN_MANIFEST} ("
        + ", ".join(f"{n} {s}" for s, n in sorted(removed.items()))
        + ")"
    )
    stamp = time.strftime("%Y-%m-%d %H:%M", time.localtime())
    parts = [
        "<!doctype html><html lang=en><head><meta charset=utf-8>",
        f"<title>{_e(campaign)}: dreamlook-batch report</title><style>{CSS}</style></head><body>",
        f"<h1>Campaign {_e(campaign)}</h1><div class=meta>{sum(counts.values())} jobs{apart if removed else ''}, "
        f"report of {stamp}, files in <code>{_e(out_dir)}</code></div>",
        "<div class=counts>"
        + "".join(f"<span><b>{n}</b> {_e(s)}</span>" for s, n in sorted(counts.items()))
        + "</div>",
        "<h2>Jobs</h2><table id=jobs><thead><tr><th>job</th><th>type</th><th>state</th><th>remote id</th>"
        "<th>files</th><th>reason</th></tr></thead><tbody>",
    ]
    # failures first; the jobs no longer in the manifest after all the others
    for r in sorted(rows, key=lambda r: (not r.in_manifest, r.state not in BAD_ENDINGS, r.id)):
        fs = files.get(r.id, [])
        css = "bad" if r.state in BAD_ENDINGS else "done" if r.state is JobState.DONE else ""
        css = css if r.in_manifest else f"removed {css}".strip()
        mark = "" if r.in_manifest else f"<span class=mark>{_e(NOT_IN_MANIFEST)}</span>" + ("; " if r.reason else "")
        parts.append(
            f"<tr class='{css}' data-job='{_e(r.id)}' data-state='{_e(r.state.value)}'>"
            f"<td>{_e(r.id)}</td><td>{_e(r.type)}</td><td class=state>{_e(r.state.value)}</td>"
            f"<td><code>{_e(r.remote_id or '')}</code></td><td>{sum(f.done for f in fs)}/{len(fs)}</td>"
            f"<td class=reason>{mark}{_e(r.reason or '')}</td></tr>"
        )
    parts.append("</tbody></table>")
    galleries = [r for r in rows if any(f.kind is ArtifactKind.IMAGE and f.done for f in files.get(r.id, []))]
    if galleries:
        parts.append("<h2>Images</h2>")
        for r in galleries:
            made = Made.of(r, out_dir)
            parts.append(f"<div class=job data-gallery='{_e(r.id)}'><h3>{_e(r.id)}</h3><div class=gallery>")
            for f in files[r.id]:
                if f.kind is ArtifactKind.IMAGE and f.done:
                    link = _href(r.id, f.name)
                    prompt, seed = made.caption(f.remote_id)
                    said = [f"<span class=prompt>{_e(prompt)}</span>"] if prompt is not None else []
                    said += [f"<span class=seed>seed {seed}</span>"] if seed is not None else []
                    parts.append(
                        f"<figure><a href='{link}'><img src='{link}' alt='{_e(prompt or f.name)}' loading=eager></a>"
                        f"<figcaption>{'<br>'.join(said)}</figcaption></figure>"
                    )
            parts.append("</div></div>")
    trained = [r for r in rows if any(f.kind is not ArtifactKind.IMAGE for f in files.get(r.id, []))]
    if trained:
        parts.append(
            "<h2>Checkpoints</h2><table id=checkpoints><thead><tr><th>job</th><th>file</th><th>kind</th>"
            "<th>base model</th><th>steps</th><th>size</th><th>sha256</th></tr></thead><tbody>"
        )
        for r in trained:
            made = Made.of(r, out_dir)
            base, steps = made.training(r)
            for f in files[r.id]:
                if f.kind is ArtifactKind.IMAGE:
                    continue
                name = f"<a href='{_href(r.id, f.name)}'>{_e(f.name)}</a>" if f.done else _e(f.name)
                state = "" if f.done else " (lost)" if f.lost else " (not downloaded)"
                step = made.steps.get(f.remote_id)  # an intermediate checkpoint: saved at this step
                at = f"{step} of {steps}" if step is not None and steps and str(step) != steps else steps
                parts.append(
                    f"<tr data-file='{_e(f.name)}'><td>{_e(r.id)}</td><td>{name}{state}</td><td>{_e(f.kind.value)}</td>"
                    f"<td class=base>{_e(base)}</td><td class=steps>{_e(at)}</td>"
                    f"<td>{human_bytes(f.size_bytes or 0)}</td><td><code>{_e(f.sha256 or '')}</code></td></tr>"
                )
        parts.append("</tbody></table>")
    parts.append(LOAD_CHECK + "</body></html>\n")
    return "\n".join(parts)


async def write_report(campaign: str, rows: Sequence[JobRow], files: dict[str, list[FileRow]], out_dir: Path) -> Path:
    path = out_dir / "report.html"
    await write_atomic(path, render(campaign, rows, files, out_dir))
    return path
