"""``ltsearch report SEARCH_DIR``: one self-contained HTML page about a search, and its figures.

What a user asks of a search, each answered by one section: which recipe won (the leaderboard,
with confirmation runs' mean ± std over fresh seeds where there are some), what each recipe
trades between head and tail classes (many- vs few-shot accuracy, the Pareto front marked),
how the trials learned and where ASHA stopped them, how the winner treats each class against
plain cross-entropy, which parameters mattered (Optuna's fANOVA importances) and where the
time went. Figures are PNGs inlined in the page (it opens with no network) and written beside
it, so the tracker can attach them to the search's record.
"""
from __future__ import annotations

import base64
import html
import io
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ltsearch.search.records import pareto_front, rungs_text
from ltsearch.search.results import SearchResults
from ltsearch.search.rungs import RUNG, RUNG_VALUES

REPORT_PAGE = "report.html"
FIGURES = "report"  # folder of the figures' PNG files, beside the page


@dataclass
class Section:
    title: str
    caption: str
    figure: Optional[object] = None  # a matplotlib Figure
    name: str = ""  # its PNG's file name
    body: str = ""  # HTML instead of (or before) a figure


def preload() -> None:
    """Import what drawing the page takes (matplotlib; Optuna's importance evaluators, which
    bring scikit-learn): about 2 s on 2 cores, which a search pays while a slot is idle."""
    import matplotlib.backends.backend_agg  # noqa: F401  (Figure.savefig's canvas)
    import matplotlib.figure  # noqa: F401
    import optuna.importance  # noqa: F401


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _colours(labels: list[str]) -> dict[str, tuple]:
    from matplotlib import colormaps

    names = sorted(set(labels))
    cmap = colormaps["tab10" if len(names) <= 10 else "tab20"]  # tab20's light halves fade
    return {label: cmap(i % cmap.N) for i, label in enumerate(names)}


def _figure(width: float = 8.0, height: float = 4.5):
    from matplotlib.figure import Figure  # no pyplot: no global state

    fig = Figure(figsize=(width, height))
    fig.subplots_adjust(left=0.09, right=0.72, bottom=0.12, top=0.92)
    return fig


def leaderboard_section(res: SearchResults) -> Section:
    rows = res.records.leaderboard(res.metric, res.mode)
    confirmations = {c["trial_id"]: c for c in res.records.confirmed(res.metric, res.mode)}
    counts: dict[str, int] = {}
    for r in res.searched():
        counts[r["method"]] = counts.get(r["method"], 0) + 1
    f = lambda v: f"{v:.3f}" if _finite(v) else "–"  # noqa: E731
    head = ["recipe", "trials", "best trial", "status", "rungs: epochs → value", res.metric, "test top1",
            "test many", "test medium", "test few"] + (["confirmed (mean ± std, seeds)"] if confirmations else [])
    lines = ["<table><thead><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr></thead><tbody>"]
    for r in rows:
        m = r["metrics"]
        cells = [r["method"], counts.get(r["method"], 0), r["trial_id"], r["status"].lower(),
                 rungs_text(r), f(m.get(res.metric)), f(m.get("test/top1")), f(m.get("test/many")),
                 f(m.get("test/medium")), f(m.get("test/few"))]
        if confirmations:
            c = confirmations.get(r["trial_id"])
            cells.append(f"{c['mean']:.3f} ± {c['std']:.3f} ({c['n']})" if c else "–")
        lines.append("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in cells) + "</tr>")
    lines.append("</tbody></table>")
    caption = (f"The best trial of each recipe by {res.metric} ({res.mode}), trials that ran to the "
               "end first. Test columns exist for those only (a pruned trial was never tested). "
               f"{res.info.get('groups', '')}.")
    if confirmations:
        caption += (" Confirmed: the trial's config re-trained to its full budget with fresh seeds; "
                    "best_config.yaml is the best confirmed mean.")
    return Section("Leaderboard", caption, body="\n".join(lines))


def head_tail_section(res: SearchResults) -> Section:
    """Many- vs few-shot validation accuracy at each trial's last evaluation, or the search's
    first two objectives when it has several (its Pareto set marked, as export writes it)."""
    objectives = res.space.settings.objectives
    x, y = objectives[:2] if objectives else ("val/many", "val/few")
    trials = [r for r in res.searched() if r["status"] in ("COMPLETED", "PRUNED")
              and _finite(r["metrics"].get(x)) and _finite(r["metrics"].get(y))]
    groups = res.info.get("groups", "")
    title = "Head vs tail" if not objectives else "The objectives"
    if not trials:
        return Section(title, f"No trial has both {x} and {y} ({groups}).")
    colours = _colours([r["method"] for r in trials])
    fig = _figure()
    ax = fig.add_subplot()
    for label in sorted(colours):
        mine = [r for r in trials if r["method"] == label]
        for status, face in (("COMPLETED", colours[label]), ("PRUNED", "none")):
            pts = [r for r in mine if r["status"] == status]
            if pts:
                first = status == "COMPLETED" or not any(r["status"] == "COMPLETED" for r in mine)
                ax.scatter([r["metrics"][x] for r in pts], [r["metrics"][y] for r in pts], s=40,
                           facecolors=face, edgecolors=colours[label], label=label if first else None)
    done = [r for r in trials if r["status"] == "COMPLETED"]
    if objectives:
        front = res.records.pareto(objectives, res.mode)
    else:
        front = [done[i] for i in pareto_front([[r["metrics"][x], r["metrics"][y]] for r in done])]
    if front:
        pts = sorted((r["metrics"][x], r["metrics"][y]) for r in front)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], color="black", lw=1, ls="--",
                marker="o", mfc="none", ms=11, label="Pareto set" if objectives else "Pareto front")
    ax.set_xlabel(x if objectives else "val many-shot accuracy (head)")
    ax.set_ylabel(y if objectives else "val few-shot accuracy (tail)")
    ax.set_title(f"{'objectives' if objectives else 'head vs tail'}: one point per trial")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    marked = ("the Pareto set over all the search's objectives (what `ltsearch export --pareto` "
              "writes)" if objectives else "the trials that ran to the end and that no other such "
              "trial beats on both axes")
    return Section(title, f"Each trial at its last evaluation, coloured by recipe; filled: ran to the "
                   f"end, hollow: stopped by ASHA (earlier, so lower). Circled on the dashed line: "
                   f"{marked}. {groups}.", fig, "head_vs_tail.png")


def curves_section(res: SearchResults) -> Section:
    """Each trial's curve over the run of the last rung it reached (its full run if it went
    on), and, beside it, the value each rung's complete run ended with: what the scheduler
    compared."""
    trials = [r for r in res.searched() if res.reports.get(r["trial_id"])]
    if not trials:
        return Section("Learning curves", "No trial reported an epoch.")
    colours = _colours([r["method"] for r in trials])
    fig = _figure(10.0, 4.5)
    fig.subplots_adjust(left=0.07, right=0.80, wspace=0.3)
    curves, rungs = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    labelled, stopped = set(), False
    fractions = res.space.settings.asha.fractions()
    for r in trials:
        reports = res.reports[r["trial_id"]]
        last = reports[-1].get(RUNG, 0)
        pts = [(x.get("rung_epoch", x["epoch"]), x[res.metric]) for x in reports
               if x.get(RUNG, 0) == last and _finite(x.get(res.metric))]
        if not pts:
            continue
        colour = colours[r["method"]]
        label = None if r["method"] in labelled else r["method"]
        labelled.add(r["method"])
        curves.plot(*zip(*pts), color=colour, lw=1.2, alpha=0.85, label=label)
        values = [(fractions[k], v) for k, v in enumerate(r.get(RUNG_VALUES) or []) if _finite(v)]
        if values:
            rungs.plot(*zip(*values), color=colour, lw=1.0, alpha=0.85, marker="o", ms=3)
        if r["status"] == "PRUNED":
            curves.scatter([pts[-1][0]], [pts[-1][1]], marker="x", s=50, color=colour, zorder=3)
            if values:
                rungs.scatter([values[-1][0]], [values[-1][1]], marker="x", s=50, color=colour, zorder=3)
            stopped = True
        elif r["status"] == "FAILED":
            curves.scatter([pts[-1][0]], [pts[-1][1]], marker="X", s=60, color="black", zorder=3)
    if stopped:  # one legend entry, in no recipe's colour
        curves.scatter([], [], marker="x", s=50, color="dimgray", label="stopped by its rung")
    curves.set_xlabel("epoch of the run")
    curves.set_ylabel(res.metric)
    curves.set_title("the last rung's run of each trial", fontsize=10)
    rungs.set_xscale("log", base=2)
    rungs.set_xticks(fractions, [f"{f:g}" for f in fractions])
    rungs.set_xlabel("rung: fraction of the full run")
    rungs.set_title("the value each complete run ended with", fontsize=10)
    curves.legend(loc="upper left", bbox_to_anchor=(2.45, 1.0), fontsize=8, frameon=False)
    asha = res.space.settings.asha
    caption = (f"Left: every trial's {res.metric} at each evaluated epoch of the last rung it "
               "reached, coloured by recipe. Right: the value each rung's run ended with; each "
               "rung trains the whole recipe compressed to that fraction of its length, and only "
               f"the best 1/{asha.reduction_factor:g} of a rung go on. × marks a trial its rung "
               "stopped." if len(fractions) > 1 else
               f"Every trial's {res.metric} at each evaluated epoch, coloured by recipe (no rungs: "
               "every trial ran its full length).")
    return Section("Learning curves", caption, fig, "learning_curves.png")


def _per_class(res: SearchResults, trial: dict) -> dict:
    last = (res.reports.get(trial["trial_id"]) or [{}])[-1]
    return {split: last[f"{split}/per_class"] for split in ("test", "val") if f"{split}/per_class" in last}


def _stopped(trial: dict) -> str:
    return "" if trial["status"] == "COMPLETED" else \
        f" ({trial['status'].lower()} at epoch {trial.get('epochs')} of {trial.get('total_epochs')})"


def per_class_section(res: SearchResults) -> Section:
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    counts = res.info.get("counts")
    ranked = res.records.ranked(res.metric, res.mode, completed_only=False)
    if not ranked or not counts:
        return Section("Per-class accuracy", "No trial with per-class accuracy (or no class counts in search.json).")
    best = next((r for r in ranked if r["status"] == "COMPLETED"), ranked[0])
    ce = next((r for r in ranked if r["method"] == "ce" and r["status"] == "COMPLETED"),
              next((r for r in ranked if r["method"] == "ce"), None))
    shown = [(f"best: {best['method']} {best['trial_id']}{_stopped(best)}", _per_class(res, best))]
    if ce is not None and ce is not best:
        shown.append((f"cross-entropy {ce['trial_id']}{_stopped(ce)}", _per_class(res, ce)))
    split = "test" if all("test" in pc for _, pc in shown) else "val"
    shown = [(label, pc[split]) for label, pc in shown if split in pc]
    fig = _figure(8.0, 5.0)
    fig.subplots_adjust(right=0.95, bottom=0.25)
    ax = fig.add_subplot()
    for (label, acc), colour, marker in zip(shown, ("tab:blue", "tab:orange"), ("o", "s")):
        xs = [n for n, a in zip(counts, acc) if _finite(a)]
        ys = [a for a in acc if _finite(a)]
        ax.scatter(xs, ys, color=colour, marker=marker, s=30, alpha=0.8, label=label)
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(ScalarFormatter())  # the counts themselves, not 10^k
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("training images of the class")
    ax.set_ylabel(f"{split} accuracy")
    ax.set_ylim(-0.03, 1.03)
    ax.set_xticks(sorted({min(counts), int(round((min(counts) * max(counts)) ** 0.5)), max(counts)}))
    ax.set_title(f"per-class {split} accuracy vs training count")
    ax.legend(loc="upper left", bbox_to_anchor=(0.0, -0.14), fontsize=8, frameon=False)
    note = "" if ce is not None else " The search ran no plain cross-entropy (ce) trial to compare with."
    why = "" if split == "test" else " (validation: a trial shown was stopped before its test)"
    return Section("Per-class accuracy", f"One point per class{why}: the best trial against the best "
                   f"plain cross-entropy trial. Long-tail methods should lift the left (rare) end.{note}",
                   fig, "per_class_accuracy.png")


def importance_section(res: SearchResults) -> Section:
    """Optuna's fANOVA importances over the trials that ran to the end (those with a value),
    with 16 trees rather than Optuna's 64: a second, not several, at every search's end, and
    over a search's few dozen trials the importances are a hint either way."""
    import optuna

    name = res.info.get("name") or res.folder.name
    title = "Which parameters mattered"
    try:
        study = optuna.load_study(study_name=name, storage=f"sqlite:///{res.folder / 'optuna.db'}")
        target = (lambda t: t.values[0]) if len(study.directions) > 1 else None
        importances = optuna.importance.get_param_importances(
            study, evaluator=optuna.importance.FanovaImportanceEvaluator(n_trees=16, seed=0), target=target)
    except Exception as e:  # too few finished trials, or no study (a search of one config)
        return Section(title, f"Not computed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                       " (it needs at least two trials that ran to the end with a parameter that varies).")
    if not importances:
        return Section(title, "Not computed: no parameter varies across the trials that ran to the end.")
    names = list(importances)[::-1]
    height = 0.4 * len(names) + 1.4  # inches: bars plus a fixed 0.9 in for the title and axis
    fig = _figure(8.0, height)
    fig.subplots_adjust(left=0.3, right=0.95, bottom=0.6 / height, top=1 - 0.4 / height)
    ax = fig.add_subplot()
    ax.barh(names, [importances[n] for n in names], color="tab:green")
    ax.set_xlabel("importance (share of the variance of the objective)")
    ax.set_title(f"parameter importance for {res.metric} (fANOVA)")
    return Section(title, "Optuna's fANOVA evaluator over the trials that ran to the end, for parameters "
                   "every such trial has (a recipe's own parameters exist only in its trials); "
                   "with few trials it is a hint, not a measurement.", fig, "param_importance.png")


def time_section(res: SearchResults) -> Section:
    spent = res.time_spent()
    if not spent:
        return Section("Time spent", "No trial has both a start and an end.")
    parts = spent["parts"]
    colours = ["tab:green", "tab:olive", "tab:blue", "tab:purple", "tab:orange", "lightgrey"]
    fig = _figure(8.0, 2.6)
    fig.subplots_adjust(left=0.05, right=0.95, bottom=0.42, top=0.85)
    ax = fig.add_subplot()
    left = 0.0
    for (name, seconds), colour in zip(parts.items(), colours):
        share = seconds / spent["slot_s"] if spent["slot_s"] > 0 else 0.0
        ax.barh([0], [share], left=[left], color=colour, label=f"{name} {seconds:.0f} s ({share:.0%})")
        left += share
    ax.set_xlim(0, max(1.0, left))
    ax.set_yticks([])
    ax.set_xlabel("share of the slot time (first trial start → last trial end × concurrent trials)")
    ax.set_title(f"time spent: training {spent['efficiency']:.0%} of {spent['slot_s']:.0f} slot-seconds")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.55), ncol=3, fontsize=8, frameon=False)
    return Section("Time spent", f"Training is the epochs themselves; the rest is what each trial paid "
                   f"around them and slots left idle. Median cost of a trial besides its epochs: "
                   f"{spent['median_fixed_s']:.2f} s.", fig, "time_spent.png")


SECTIONS = (leaderboard_section, head_tail_section, curves_section, per_class_section,
            importance_section, time_section)

STYLE = """body{font-family:system-ui,sans-serif;max-width:1000px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;font-size:0.85em}th,td{border-bottom:1px solid #ddd;padding:4px 8px;text-align:right}
th:first-child,td:first-child{text-align:left}img{max-width:100%}p.caption{color:#555;font-size:0.9em}"""


def build_sections(res: SearchResults) -> list[Section]:
    return [make(res) for make in SECTIONS]


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def write_report(folder: Path, out: Optional[Path] = None) -> Path:
    """Write ``report.html`` and ``report/*.png`` in ``out`` (default: the search folder); the
    page's path."""
    res = SearchResults.load(folder)
    out = Path(out or folder)
    figures = out / FIGURES
    figures.mkdir(parents=True, exist_ok=True)
    statuses: dict[str, int] = {}
    for r in res.searched():
        statuses[r["status"].lower()] = statuses.get(r["status"].lower(), 0) + 1
    name = res.info.get("name") or Path(folder).name
    parts = [f"<!doctype html><html lang=en><head><meta charset=utf-8><title>ltsearch: {html.escape(name)}</title>"
             f"<style>{STYLE}</style></head><body>",
             f"<h1>Search {html.escape(name)}</h1>",
             f"<p>{len(res.searched())} trials ({html.escape(', '.join(f'{v} {k}' for k, v in sorted(statuses.items())))}); "
             f"selected by {html.escape(res.metric)} ({res.mode}). {html.escape(res.info.get('data', ''))}</p>"]
    for section in build_sections(res):
        parts.append(f"<section><h2>{html.escape(section.title)}</h2>")
        if section.body:
            parts.append(section.body)
        if section.figure is not None:
            png = _png(section.figure)
            (figures / section.name).write_bytes(png)
            parts.append(f'<img alt="{html.escape(section.title)}" src="data:image/png;base64,'
                         f'{base64.b64encode(png).decode()}">')
        parts.append(f'<p class="caption">{html.escape(section.caption)}</p></section>')
    parts.append("</body></html>")
    page = out / REPORT_PAGE
    page.write_text("\n".join(parts))
    return page


def _writable(folder: Path) -> bool:
    """Whether files can be made in ``folder`` (a read-only mount passes ``os.access`` for root)."""
    import tempfile

    try:
        tempfile.TemporaryFile(dir=folder).close()
        return True
    except OSError:
        return False


def main_report(args) -> int:
    """Write the page; attach it and its figures to the search's tracking record, if any."""
    from ltsearch.config import ConfigError
    from ltsearch.search.results import read_info
    from ltsearch.search.tracker import TrackingError, make_tracker

    from ltsearch.config import writable_folder
    from ltsearch.search.folder import FolderLock

    folder = Path(args.search_dir).resolve()
    if not (folder / "trials.json").is_file():
        raise ConfigError("search_dir", f"{folder} holds no trials.json: not a search folder")
    info = read_info(folder)
    if args.out:  # elsewhere: the folder is only read, so no lock (a running search may hold it)
        page = write_report(folder, writable_folder(Path(args.out).resolve(), "--out"))
    else:
        if not _writable(folder):
            raise ConfigError("search_dir", f"{folder} cannot be written (read-only): write the "
                                            "page elsewhere with --out DIR")
        with FolderLock(folder):
            page = write_report(folder)  # the folder is all the page needs
    print(page)
    kind = "none" if args.no_tracking else info.get("tracking", "none")
    try:
        tracker = make_tracker(kind, args.tracking_uri or info.get("tracking_uri"),
                               info.get("experiment", "ltsearch"), info.get("classes", []),
                               info.get("counts", []), background=False)
        tracker.attach(folder, [page, page.parent / FIGURES])
    except ConfigError as e:
        raise ConfigError(e.key, f"{e.message}; the page is written, not attached "
                                 "(--no-tracking: write it without attaching)") from None
    except TrackingError as e:
        print(f"error: the page is written; attaching it to the search's run in {tracker.uri} "
              f"failed ({e}): run `ltsearch report {folder}` again", file=sys.stderr)
        return 1
    if tracker.uri:
        print(f"attached to the search's run in {tracker.uri}")
    return 0
