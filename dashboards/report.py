"""`dynastudy report`: the dashboard's Pareto and compare plots as one self-contained HTML file (plotly.js
inlined once, no server, no network) and PNGs (matplotlib), for sharing a study without a server.

Written into a fresh folder beside the output first and moved into place only when everything rendered, so a
failed report leaves the output folder as it was.
"""

from __future__ import annotations

import html
import shutil
import tempfile
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import yaml  # noqa: E402

from dashboards import figures  # noqa: E402
from dashboards.data import StudyCache  # noqa: E402
from study.tracking import redact  # noqa: E402
from trainables.hparams import ConfigError  # noqa: E402


def _png(points: pd.DataFrame, split: str, budget: float | None, path: Path, title: str) -> None:
    acc, macs, acc_title, macs_title = figures.SPLITS[split]
    fig, ax = plt.subplots(figsize=(9, 5.5), dpi=120)
    groups = figures.group_of(points)
    for g in sorted(groups.unique()):
        part = points[(groups == g).to_numpy()]
        ax.scatter(part[macs], part[acc], s=10, alpha=0.25, color=figures.color(g))
        front = figures.front_of(part, split)
        ax.step(front[macs], front[acc], where="post", color=figures.color(g), marker="o", ms=4, label=g)
    best = figures.best_under(points, budget)
    if budget is not None and budget != float("inf"):
        ax.axvline(budget, color="#444", ls="--", lw=1)
    if best is not None:
        ax.scatter([best[macs]], [best[acc]], marker="*", s=260, color="gold", edgecolor="black", zorder=5,
                   label=f"best under budget ({best['method']}, trial {best['trial']})")
    ax.set_xscale("log")
    ax.set_xlabel(macs_title)
    ax.set_ylabel(acc_title)
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _table_html(table: pd.DataFrame, ref_macs: float, budget: float | None) -> str:
    head = figures.COMPARE_HEADER
    rows = ["<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in figures.compare_cells(r)) + "</tr>"
            for r in table.itertuples()]
    configs = "".join(
        f"<details><summary>config of the best {html.escape(r.group)} point (dynastudy run --config FILE)"
        f"</summary><pre>{html.escape(yaml.safe_dump(r.config, sort_keys=False))}</pre></details>"
        for r in table.itertuples() if r.config)
    bound = f"under {budget / 1e6:.4g} M MACs" if budget not in (None, float("inf")) else "without a MACs budget"
    return (f"<table><tr>{''.join(f'<th>{h}</th>' for h in head)}</tr>{''.join(rows)}</table>"
            f"<p class=note>Hypervolume of validation accuracy x MACs against one reference point (val_acc 0, "
            f"{ref_macs / 1e6:.4g} M MACs). Best points chosen on validation accuracy {bound}, as "
            f"<code>dynastudy best</code> chooses them; test accuracy is only reported.</p>{configs}")


def write_report(cache: StudyCache, studies: list[str], out: Path, budget: float | None = None) -> list[Path]:
    """report.html plus pareto-<study>-{val,test}.png per study and compare.png; returns the files written."""
    out = out.resolve()
    if not out.parent.is_dir():
        raise ConfigError(f"--out {out}: the folder {out.parent} does not exist")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; give a folder")
    per_study = {s: cache.points(s) for s in studies}
    empty = [s for s, p in per_study.items() if p.empty]
    if empty:
        raise ConfigError(f"study {empty[0]!r} has no finished trial with a frontier yet; nothing to report")
    pick = budget if budget is not None else float("inf")  # no budget: the most accurate point of each group
    sections, pngs = [], {}
    first = True
    for study, points in per_study.items():
        for split in ("val", "test"):
            fig = figures.pareto_figure(points, split, budget=budget,
                                        title=f"study {study}: {points['run_id'].nunique()} trials, {len(points)} "
                                              f"operating points ({figures.SPLITS[split][2]})")
            sections.append(fig.to_html(full_html=False, include_plotlyjs=first, default_height="560px"))
            first = False
            pngs[f"pareto-{study}-{split}.png"] = (points, split, f"study {study}")
    points = pd.concat(per_study.values(), ignore_index=True)
    fig = figures.pareto_figure(points, "val", budget=budget, title="compare: " + ", ".join(studies))
    table, ref = figures.compare_table(points, pick)
    pngs["compare.png"] = (points, "val", "compare: " + ", ".join(studies))
    body = "".join(f"<section>{s}</section>" for s in sections)
    names = html.escape(", ".join(studies))
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>dynastudy report: {names}</title>
<style>body{{font-family:sans-serif;margin:16px}} table{{border-collapse:collapse}} td,th{{padding:3px 10px;
border-bottom:1px solid #ddd;text-align:left}} .note{{color:#555;font-size:13px}} pre{{background:#f7f7f7}}</style>
</head><body><h2>dynastudy report: {names}</h2>
<p class=note>Tracking store {html.escape(redact(cache.tracker.uri))}; written {time.strftime('%Y-%m-%d %H:%M:%S %Z')}.
Accuracy vs expected MACs per image (FLOPs = 2 x MACs); every frontier point of every trial faint, each method's
non-dominated front as a line.</p>{body}
<h3>Compare</h3><section>{fig.to_html(full_html=False, include_plotlyjs=False, default_height="560px")}</section>
{_table_html(table, ref, pick)}</body></html>"""
    created = not out.exists()
    out.mkdir(exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".report-", dir=out))
    done = False
    try:
        (staging / "report.html").write_text(page)
        for name, (pts, split, title) in pngs.items():
            _png(pts, split, pick if budget is not None else None, staging / name, title)
        written = []
        for f in sorted(staging.iterdir()):
            f.replace(out / f.name)
            written.append(out / f.name)
        done = True
        return written
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if created and not done:
            shutil.rmtree(out, ignore_errors=True)
