"""`posttrain report`: metrics per stage as a table (rows: metrics, columns: stages, deltas against the
base), loss curves per training stage as PNG, and the lineage graph, in Markdown and HTML."""
from __future__ import annotations

import html
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from posttrain.registry import Entry, short

def curves_of(kind: str) -> dict[str, str]:
    """Metric series worth plotting for a kind (its `Stage.curves` hook); a kind no longer installed gets
    the losses."""
    from posttrain.core.errors import UserError
    from posttrain.kinds import get_stage

    try:
        return get_stage(kind).curves()
    except UserError:
        return {"loss": "train loss", "eval_loss": "eval loss"}


@dataclass
class Report:
    title: str
    entries: dict[str, Entry]  # stage name -> entry, in recipe order
    columns: list[str] = field(default_factory=list)  # evaluated models
    rows: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)  # metric -> model -> value/stderr
    chosen: dict[str, str] = field(default_factory=dict)  # select step -> the candidate it chose


def build(title: str, entries: dict[str, Entry]) -> Report:
    # A select step's ref points at the candidate it chose: keep that as a mark, not a second entry.
    chosen = {name: entry.manifest["stage"] for name, entry in entries.items()
              if entry.manifest.get("candidate") and entry.manifest.get("stage") != name}
    report = Report(title, {n: e for n, e in entries.items() if n not in chosen}, chosen=chosen)
    entries = report.entries
    evals = [name for name, entry in entries.items() if entry.kind == "eval"]
    for stage, entry in entries.items():
        if entry.kind != "eval":
            continue
        prefix = f"{stage}: " if len(evals) > 1 else ""  # several eval stages may share metric names
        results = entry.manifest.get("metrics", {}).get("results", {})
        order = entry.manifest.get("config", {}).get("models") or sorted(results)  # the recipe's order
        for model in order:
            metrics = results.get(model, {})
            if model not in report.columns:
                report.columns.append(model)
            for metric, value in metrics.items():
                report.rows.setdefault(prefix + metric, {})[model] = value
    return report


def series(values: Any) -> list[tuple[float, float]]:
    """[(step, value)] from the shapes stages store: {"step", "loss"|"eval_loss"|"value"}."""
    points = []
    for item in values if isinstance(values, list) else []:
        if isinstance(item, dict) and "step" in item:
            value = next((item[k] for k in ("value", "loss", "eval_loss") if k in item), None)
            if isinstance(value, (int, float)):
                points.append((float(item["step"]), float(value)))
    return points


def table_lines(report: Report, fmt: str = "text") -> list[str]:
    if not report.rows:
        return []
    base = "base" if "base" in report.columns else None
    header = ["metric", *report.columns]

    def cell(metric: str, model: str) -> str:
        value = report.rows[metric].get(model)
        if value is None:
            return "-"
        text = f"{value['value']:.4g}"
        if value.get("stderr") is not None:
            text += f" ± {value['stderr']:.2g}"
        reference = report.rows[metric].get(base) if base and model != base else None
        if reference is not None:
            text += f" ({value['value'] - reference['value']:+.3g})"
        return text

    rows = [[metric, *(cell(metric, m) for m in report.columns)] for metric in sorted(report.rows)]
    if fmt == "markdown":
        return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    return ["  ".join(str(v).ljust(w) for v, w in zip(r, widths)) for r in [header, *rows]]


def _save_figure(plt, fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_curves(report: Report, out: Path) -> dict[str, Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = {}
    for name, entry in report.entries.items():
        metrics = entry.manifest.get("metrics", {})
        curves = curves_of(entry.kind)
        available = {key: series(metrics.get(key)) for key in curves}
        available = {k: v for k, v in available.items() if v}
        if not available:
            continue
        fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
        for key, points in available.items():
            steps, values = zip(*points)
            ax.plot(steps, values, marker="o" if len(points) < 3 else None, linewidth=1.8, label=curves[key])
        ax.set_title(f"{name} ({entry.kind})")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend()
        written[name] = _save_figure(plt, fig, out / f"curves-{name}.png")
    return written


def plot_lineage(report: Report, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = {entry.key: name for name, entry in report.entries.items()}
    depth: dict[str, int] = {}

    def level(name: str) -> int:
        if name not in depth:
            inputs = report.entries[name].manifest.get("inputs", {}).values()
            parents = [names[k] for k in inputs if k in names]
            depth[name] = 1 + max((level(p) for p in parents), default=-1)
        return depth[name]

    for name in report.entries:
        level(name)
    columns: dict[int, list[str]] = {}
    for name in report.entries:
        columns.setdefault(depth[name], []).append(name)
    position = {n: (d, -i) for d, group in columns.items() for i, n in enumerate(group)}
    fig, ax = plt.subplots(figsize=(2.2 * (max(columns) + 1) + 1, 1.2 * max(len(g) for g in columns.values()) + 1),
                           dpi=100)
    for name, entry in report.entries.items():
        for key in entry.manifest.get("inputs", {}).values():
            if key in names:
                (x0, y0), (x1, y1) = position[names[key]], position[name]
                skips = x1 - x0 > 1 or y0 != y1  # curve edges that would run behind other boxes
                ax.annotate("", xy=(x1 - 0.3, y1), xytext=(x0 + 0.3, y0),
                            arrowprops={"arrowstyle": "->", "color": "#555555",
                                        "connectionstyle": f"arc3,rad={-0.3 if skips else 0}"})
    for name, (x, y) in position.items():
        entry = report.entries[name]
        ax.text(x, y, f"{name}\n{entry.kind} · {short(entry.key)[:8]}", ha="center", va="center", fontsize=8,
                bbox={"boxstyle": "round", "facecolor": "#dbe9f6", "edgecolor": "#1f77b4"})
    ax.set_xlim(-0.6, max(columns) + 0.6)
    ax.set_ylim(-max(len(g) for g in columns.values()) + 0.4, 1.0)
    ax.axis("off")
    return _save_figure(plt, fig, out / "lineage.png")


def training_summary(report: Report) -> list[tuple[str, str, str]]:
    """(stage, kind, short summary) for the stages that trained."""
    lines = []
    for name, entry in report.entries.items():
        m = entry.manifest.get("metrics", {})
        parts = []
        for key in ("final_train_loss", "final_eval_loss", "steps", "tokens_per_second", "train_seconds"):
            if isinstance(m.get(key), (int, float)):
                parts.append(f"{key}={m[key]:.4g}")
        margins = series(m.get("rewards_margins"))
        if margins:
            parts.append(f"reward margin {margins[0][1]:.3g} -> {margins[-1][1]:.3g}")
        if parts:
            lines.append((name, entry.kind, ", ".join(parts)))
    return lines


DATA_COLUMNS = ("source", "rows_read", "rows_used", "skipped", "truncated", "dropped", "contaminated",
                "top skip reason")


def data_rows(report: Report) -> list[list[str]]:
    """One row per data source of every stage that read data: read, used, skipped, truncated, dropped."""
    rows = []
    for name, entry in report.entries.items():
        for source in entry.manifest.get("metrics", {}).get("sources") or []:
            reasons = source.get("skipped_by_reason") or {}
            top = max(reasons, key=reasons.get) if reasons else ""
            rows.append([name, str(source.get("source", "?")),
                         *(str(source.get(k, "-")) for k in ("rows_read", "rows_used", "skipped", "truncated", "dropped",
                                                             "contaminated")),
                         f"{top} ({reasons[top]})" if top else ""])
    return rows


def decontamination_lines(report: Report) -> list[str]:
    """One line per stage that decontaminated its data: policy and rows per benchmark."""
    lines = []
    for name, entry in report.entries.items():
        summary = entry.manifest.get("metrics", {}).get("decontamination")
        if summary:
            rules = summary.get("by_task_and_rule", {})
            tasks = ", ".join(f"{t}: {n}" + (" [" + ", ".join(f"{r} {c}" for r, c in sorted(rules[t].items())) + "]"
                                            if t in rules else "")
                              for t, n in sorted(summary["by_task"].items())) or "none found"
            lines.append(f"{name}: {summary['contaminated']} of {summary['checked']} rows contained evaluation items "
                         f"({summary['policy']}; {tasks}); see removed.jsonl in the entry")
    return lines


def candidates(report: Report) -> dict[str, list[dict[str, Any]]]:
    """Swept stage -> its candidates, in sweep order: name, settings, every eval metric, selections."""
    found: dict[str, list[dict[str, Any]]] = {}
    objectives = combined_objectives(report)
    for name, entry in report.entries.items():
        info = entry.manifest.get("candidate")
        if not info:
            continue
        scores = {f"{step} {record['combine']}": record["scores"][name] for step, record in objectives.items()
                  if record["of"] == info["of"] and isinstance(record["scores"].get(name), (int, float))}
        found.setdefault(info["of"], []).append({
            "name": name, "settings": info["overrides"], "config": entry.manifest.get("config") or {},
            "metrics": {**{metric: by_model[name]["value"] for metric, by_model in report.rows.items()
                           if name in by_model}, **scores},
            "chosen_as": sorted(step for step, candidate in report.chosen.items() if candidate == name)})
    for listed in found.values():
        # Every setting any candidate sweeps, for each candidate as its stage ran it (a variant that
        # leaves `method` alone shows the stage's own method, not a blank).
        keys = list(dict.fromkeys(k for c in listed for k in c["settings"]))
        for c in listed:
            config = c.pop("config")
            c["settings"] = {k: setting_text(_dotted(config, k, c["settings"].get(k, "-"))) for k in keys}
    return found


_MISSING = object()


def _dotted(config: dict[str, Any], key: str, fallback: Any) -> Any:
    """A candidate's setting as its stage ran it (selections resolved to the steps they became), or the
    sweep's own value for a key the config does not keep (a merge's `weights` shorthand)."""
    node: Any = config
    for part in key.split("."):
        if isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        elif isinstance(node, dict) and part in node:
            node = node[part]
        else:
            return fallback
    return node


def setting_text(value: Any) -> Any:
    """A swept setting as a table cell: numbers stay numbers (plots need them); models by name, with
    their own parameters; mappings as k=v."""
    if isinstance(value, (int, float, str, bool)) or value is None:
        return value
    if isinstance(value, dict) and "model" in value:
        params = value.get("parameters") or {}
        return str(setting_text(value["model"])) + (f" ({setting_text(params)})" if params else "")
    if isinstance(value, dict) and ("best_of" in value or "top_k" in value):
        return f"{value['best_of']}.best" if value.get("best_of") else f"top {value['top_k']} of {value.get('of')}"
    if isinstance(value, dict):
        return ", ".join(f"{k}={setting_text(v)}" for k, v in value.items())
    if isinstance(value, list):
        return "[" + ", ".join(str(setting_text(v)) for v in value) + "]"
    return str(value)


def combined_objectives(report: Report) -> dict[str, dict[str, Any]]:
    """select step -> its record, for selections on a dev objective of several metrics (the record the
    stages that took the choice keep in their manifests: parts, scores, combine)."""
    found = {}
    for entry in report.entries.values():
        for record in (entry.manifest.get("selections") or {}).values():
            if isinstance(record, dict) and record.get("combine") and record.get("step"):
                found[record["step"]] = record
    return found


def candidate_lines(report: Report) -> list[str]:
    """A Markdown table per swept stage: candidates side by side, the chosen ones marked."""
    lines = []
    for stage, listed in candidates(report).items():
        settings = list(dict.fromkeys(k for c in listed for k in c["settings"]))
        metrics = list(dict.fromkeys(m for c in listed for m in c["metrics"]))
        lines += [f"### {stage}", "", "| candidate | " + " | ".join(settings + metrics) + " | chosen as |",
                  "|---" * (len(settings) + len(metrics) + 2) + "|"]
        for c in listed:
            cells = [str(c["settings"].get(k, "-")) for k in settings]
            cells += [f"{c['metrics'][m]:.4g}" if m in c["metrics"] else "-" for m in metrics]
            mark = ", ".join(f"**{step}**" for step in c["chosen_as"]) or ""
            lines.append(f"| {c['name']} | " + " | ".join(cells) + f" | {mark} |")
        lines.append("")
    return lines


def plot_sweeps(report: Report, out: Path) -> dict[str, Path]:
    """Per swept stage: each eval metric against each swept setting, chosen candidates as stars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = {}
    for stage, listed in candidates(report).items():
        settings = list(dict.fromkeys(k for c in listed for k in c["settings"]))
        metrics = list(dict.fromkeys(m for c in listed for m in c["metrics"]))
        if not settings or not metrics:
            continue
        fig, axes = plt.subplots(len(metrics), len(settings), figsize=(4 * len(settings), 3 * len(metrics)),
                                 dpi=100, squeeze=False)
        for row, metric in enumerate(metrics):
            for col, setting in enumerate(settings):
                ax = axes[row][col]
                values = [c["settings"].get(setting) for c in listed]
                numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
                labels = sorted({str(v) for v in values})
                for c, value in zip(listed, values):
                    if metric not in c["metrics"]:
                        continue
                    x = value if numeric else labels.index(str(value))
                    ax.scatter([x], [c["metrics"][metric]], marker="*" if c["chosen_as"] else "o",
                               s=160 if c["chosen_as"] else 40, color="tab:red" if c["chosen_as"] else "tab:blue")
                if numeric and min(values) > 0 and max(values) / min(values) >= 10:
                    ax.set_xscale("log")
                if not numeric:
                    ax.set_xticks(range(len(labels)), labels)
                ax.set_xlabel(setting)
                ax.set_ylabel(metric)
                ax.grid(alpha=0.3)
        fig.suptitle(f"{stage}: candidates (stars: chosen)")
        written[stage] = _save_figure(plt, fig, out / f"sweep-{stage}.png")
    return written


def write(report: Report, out: Path) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    curves = plot_curves(report, out)
    sweeps = plot_sweeps(report, out)
    lineage = plot_lineage(report, out)
    summary = training_summary(report)
    md = [f"# {report.title}", ""]
    if report.rows:
        md += ["## Evaluation", "", "Values ± stderr; (deltas against base).", "", *table_lines(report, "markdown"), ""]
    if summary:
        md += ["## Training", "", "| stage | kind | summary |", "|---|---|---|"]
        md += [f"| {n} | {k} | {s} |" for n, k, s in summary] + [""]
    data = data_rows(report)
    if data:
        md += ["## Data sources", "", "| stage | " + " | ".join(DATA_COLUMNS) + " |", "|---" * (len(DATA_COLUMNS) + 1) + "|"]
        md += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in data] + [""]
    swept = candidate_lines(report)
    if swept:
        md += ["## Candidates", "", "Every candidate of each sweep with its scores; the chosen ones marked.", "", *swept]
        md += [f"![{stage} candidates]({path.name})" for stage, path in sweeps.items()] + [""]
    contamination = decontamination_lines(report)
    if contamination:
        md += ["## Decontamination", "", *(f"- {line}" for line in contamination), ""]
    md += ["## Lineage", "", f"![lineage]({lineage.name})", ""]
    for name, path in curves.items():
        md += [f"### {name}", "", f"![{name}]({path.name})", ""]
    md += ["## Entries", "", "| stage | kind | key |", "|---|---|---|"]
    md += [f"| {n} | {e.kind} | `{e.key}` |" for n, e in report.entries.items()]
    (out / "report.md").write_text("\n".join(md) + "\n")
    (out / "report.html").write_text(_html(report, curves, lineage, summary, data, sweeps))
    (out / "report.json").write_text(json.dumps({"columns": report.columns, "rows": report.rows}, indent=2) + "\n")
    return {"markdown": out / "report.md", "html": out / "report.html", "lineage": lineage, **curves,
            **{f"sweep-{stage}": path for stage, path in sweeps.items()}}


def _html(report: Report, curves: dict[str, Path], lineage: Path, summary, data: list[list[str]],
          sweeps: dict[str, Path] | None = None) -> str:
    esc = html.escape
    parts = [f"<!doctype html><meta charset=utf-8><title>{esc(report.title)}</title>",
             "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}td:first-child{text-align:left}</style>",
             f"<h1>{esc(report.title)}</h1>"]
    if report.rows:
        lines = table_lines(report, "markdown")
        header = [c.strip() for c in lines[0].strip("|").split("|")]
        parts.append("<h2>Evaluation</h2><table><tr>" + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr>")
        for line in lines[2:]:
            cells = [c.strip() for c in line.strip("|").split("|")]
            parts.append("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in cells) + "</tr>")
        parts.append("</table>")
    if summary:
        parts.append("<h2>Training</h2><table><tr><th>stage</th><th>kind</th><th>summary</th></tr>")
        parts += [f"<tr><td>{esc(n)}</td><td>{esc(k)}</td><td>{esc(s)}</td></tr>" for n, k, s in summary]
        parts.append("</table>")
    if data:
        parts.append("<h2>Data sources</h2><table><tr>" + "".join(f"<th>{esc(h)}</th>" for h in ("stage", *DATA_COLUMNS))
                     + "</tr>")
        parts += ["<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in data]
        parts.append("</table>")
    swept = candidate_lines(report)
    if swept:
        parts.append("<h2>Candidates</h2>")
        for line in swept:
            if line.startswith("### "):
                parts.append(f"<h3>{esc(line[4:])}</h3><table>")
            elif line.startswith("| candidate"):
                parts.append("<tr>" + "".join(f"<th>{esc(c.strip())}</th>" for c in line.strip("|").split("|")) + "</tr>")
            elif line.startswith("| "):
                parts.append("<tr>" + "".join(f"<td>{esc(c.strip().replace('**', ''))}</td>"
                                              for c in line.strip("|").split("|")) + "</tr>")
            elif not line:
                parts.append("</table>")
        parts += [f"<img src='{path.name}' alt='{esc(stage)} candidates'>" for stage, path in (sweeps or {}).items()]
    contamination = decontamination_lines(report)
    if contamination:
        parts.append("<h2>Decontamination</h2><ul>" + "".join(f"<li>{esc(x)}</li>" for x in contamination) + "</ul>")
    parts.append(f"<h2>Lineage</h2><img src='{lineage.name}' alt='lineage'>")
    for name, path in curves.items():
        parts.append(f"<h3>{esc(name)}</h3><img src='{path.name}' alt='{esc(name)} curves'>")
    return "\n".join(parts) + "\n"
