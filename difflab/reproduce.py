"""`difflab reproduce PAPER|all [--quick] [--out DIR]`: every paper's claim, our verdict and the
numbers that decide it, in one static site.

    difflab reproduce --list                 # the papers, their claims and the committed verdicts
    difflab reproduce dit --quick            # rerun one paper's experiment at its QUICK settings
    difflab reproduce all --show             # no rerun: the site from the committed full results
    difflab reproduce all                    # rerun everything at full settings (hours)

Each paper's experiment is papers/NAME/run.py (its `PAPER`, run by papers/runner.py). A rerun
writes into OUT/NAME/run/ (results.json, report.md, figures/); a paper that is not rerun is shown
from its committed full run (papers/NAME/). The site is OUT/index.html: per paper the claim in one
sentence, each measured claim with its verdict (holds / partly / does not hold) and the numbers
that decide it, the main figure and the command; OUT/NAME/index.html renders the paper's whole
report; OUT/verdicts.json holds the same table for scripts.

Verdicts are read from each report's "Claims, measured" section, which the paper's own report
code writes from results.json (one source of the reasoning): a claim that says "does not hold" is
"does not hold"; one that holds only as a trend, not monotonically, within noise, or mixed is
"partly"; one that "holds" or is "reproduced" holds; the rest are measurements without a verdict.

papers/ lives in the repository, not in the wheel: `difflab reproduce` runs from a checkout.
"""

from __future__ import annotations

import argparse
import html
import importlib
import json
import re
import shlex
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from difflab.core.validation import SEED, add_device_arguments
from difflab.runfolder import atomic_write_bytes

__all__ = [
    "Claim",
    "PaperResult",
    "papers",
    "read_claims",
    "shortened",
    "reproduce",
    "build_site",
    "markdown_to_html",
    "add_reproduce_parser",
]

VERDICTS = ("holds", "partly", "does not hold", "measured")


def _repo_root() -> Path:
    root = Path(__file__).resolve().parents[1]
    if not (root / "papers" / "runner.py").is_file():
        raise FileNotFoundError(
            f"no papers/ next to difflab ({root}): `difflab reproduce` runs from a repository checkout "
            "(papers/ is not installed with the wheel)"
        )
    return root


def papers() -> dict:
    """name -> the `Paper` of every papers/NAME/run.py, in name order."""
    root = _repo_root()
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    names = sorted(p.parent.name for p in (root / "papers").glob("*/run.py"))
    return {name: importlib.import_module(f"papers.{name}.run").PAPER for name in names}


# --------------------------------------------------------------------------------------------
# Claims and verdicts, read from a report
# --------------------------------------------------------------------------------------------


@dataclass
class Claim:
    claim: str  # the bold head of the report's bullet
    verdict: str  # one of VERDICTS
    numbers: str  # the rest of the bullet: the measurements that decide it


_PARTLY = ("not monotonically", "within noise", "mixed result", "partly", "falls short", "but not ")


def _verdict(text: str) -> str:
    low = text.lower()
    positive = re.search(r"(?<!not )\bholds\b|(?<!not )\breproduced\b", low) is not None
    negative = "does not hold" in low or "not reproduced" in low
    if negative:
        return "partly" if positive else "does not hold"  # several parts, some hold
    if positive and any(k in low for k in _PARTLY):
        return "partly"
    if "mixed result" in low:
        return "partly"
    return "holds" if positive else "measured"


def read_claims(report: str) -> list[Claim]:
    """The bullets of a report's "Claim(s), measured" section, each with its verdict."""
    claims, inside, bullet = [], False, None
    for line in report.splitlines() + [""]:
        if line.startswith("## "):
            inside = "claim" in line.lower() and "measured" in line.lower()
            continue
        if not inside:
            continue
        if line.startswith("- "):
            if bullet is not None:
                claims.append(bullet)
            bullet = line[2:].strip()
        elif bullet is not None and line.strip() and not line.startswith(("#", "|", "!")):
            bullet += " " + line.strip()
        elif bullet is not None and not line.strip():
            claims.append(bullet)
            bullet = None
    out = []
    for text in claims:
        m = re.match(r"\*\*(.+?)\*\*\s*(.*)", text)
        head, rest = (m.group(1).strip(), m.group(2).strip()) if m else (text[:80], text)
        out.append(Claim(head.rstrip("."), _verdict(head + " " + rest), rest))
    return out


def shortened(paper) -> list[str]:
    """What --quick changes: each setting whose QUICK value differs from FULL, as 'name full -> quick'."""
    out = []
    for key in paper.full:
        full, quick = paper.full[key], paper.quick.get(key, paper.full[key])
        if full != quick:
            out.append(f"{key} {_short(full)} -> {_short(quick)}")
    return out


def _short(value) -> str:
    text = json.dumps(value) if isinstance(value, dict | list | tuple) else str(value)
    return text if len(text) <= 60 else text[:57] + "..."


# --------------------------------------------------------------------------------------------
# Running papers
# --------------------------------------------------------------------------------------------


@dataclass
class PaperResult:
    name: str
    title: str
    claim: str
    folder: str  # where results.json, report.md and figures/ are
    source: str  # "committed full run", "quick rerun" or "full rerun"
    command: str
    shortened: list[str]
    claims: list[Claim]
    figure: str | None  # the report's first figure, relative to `folder`
    cpu_seconds: float | None = None  # of this rerun

    def counts(self) -> dict[str, int]:
        return {v: sum(c.verdict == v for c in self.claims) for v in VERDICTS}


def _first_figure(report: str, folder: Path) -> str | None:
    for m in re.finditer(r"!\[[^\]]*\]\(([^)]+)\)", report):
        if (folder / m.group(1)).is_file():
            return m.group(1)
    return None


def _result(paper, folder: Path, source: str, cpu: float | None = None) -> PaperResult:
    report_path = folder / "report.md"
    report = report_path.read_text() if report_path.is_file() else ""
    quick = source == "quick rerun"
    command = f"difflab reproduce {paper.name}" + (" --quick" if quick else "")
    return PaperResult(
        paper.name,
        paper.title or paper.name,
        paper.claim,
        str(folder),
        source,
        command,
        shortened(paper) if quick else [],
        read_claims(report),
        _first_figure(report, folder),
        cpu,
    )


def reproduce(
    names: list[str],
    *,
    quick: bool = False,
    out: str | Path = "reproduce_out",
    rerun: bool = True,
    seed: int = 0,
    paper_args: list[str] | None = None,
    device: str = "auto",
    dtype: str = "fp32",
) -> list[PaperResult]:
    """Rerun `names` (unless not `rerun`) and write the site for every paper to `out`.

    `paper_args` go to each rerun paper's own flags (e.g. ["--only", "oracle"]; see
    `python -m papers.NAME.run --help`). `device` and `dtype` are where and how the pretrained
    pipelines the papers load run (trainings inside a paper stay on the CPU)."""
    from papers.runner import cpu_seconds, main

    all_papers = papers()
    unknown = [n for n in names if n not in all_papers]
    if unknown:
        raise ValueError(f"unknown paper(s) {unknown}; known: {', '.join(all_papers)} (or all)")
    out = Path(out)
    results = []
    for name, paper in all_papers.items():
        if rerun and name in names:
            folder = out / name / "run"
            c0 = time.perf_counter()
            cpu0 = cpu_seconds()
            print(f"reproduce {name}" + (" --quick: " + "; ".join(shortened(paper)) if quick else " (full settings)"))
            flags = ["--out", str(folder), "--seed", str(seed), "--device", str(device), "--dtype", str(dtype)]
            flags += ["--quick"] if quick else []
            main(paper, flags + list(paper_args or []))
            cpu = cpu_seconds() - cpu0
            print(f"reproduce {name}: {time.perf_counter() - c0:.0f} s wall, {cpu / 60:.1f} CPU-min")
            results.append(_result(paper, folder, "quick rerun" if quick else "full rerun", cpu))
        else:
            results.append(_result(paper, paper.folder, "committed full run"))
    build_site(results, out)
    return results


# --------------------------------------------------------------------------------------------
# The site
# --------------------------------------------------------------------------------------------

_CSS = """
body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222;line-height:1.45}
table{border-collapse:collapse;margin:1em 0;font-size:0.92em}td,th{border:1px solid #ccc;padding:4px 8px;
vertical-align:top}th{background:#f3f3f3}img{max-width:100%}code{background:#f4f4f4;padding:1px 3px}
pre{background:#f4f4f4;padding:8px;overflow-x:auto}.holds{color:#17702a;font-weight:bold}
.partly{color:#9a6700;font-weight:bold}.does-not-hold{color:#b3261e;font-weight:bold}
.measured{color:#555}.thumb{max-width:260px}.note{color:#555;font-size:0.9em}
"""


def _inline(text: str) -> str:
    text = html.escape(text, quote=False)
    text = re.sub(r"!\[([^\]]*)\]\(([^)]+)\)", r'<img src="\2" alt="\1">', text)
    text = re.sub(r"\[([^\]]+)\]\(([^)]+)\)", r'<a href="\2">\1</a>', text)
    text = re.sub(r"`([^`]+)`", r"<code>\1</code>", text)
    text = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", text)
    return text


def markdown_to_html(md: str) -> str:
    """The Markdown our reports use: headings, paragraphs, lists, tables, images, code, bold, links."""
    out, para, lines, i = [], [], md.splitlines(), 0

    def flush():
        if para:
            out.append("<p>" + _inline(" ".join(para)) + "</p>")
            para.clear()

    while i < len(lines):
        line = lines[i]
        if line.startswith("```"):
            flush()
            j = i + 1
            while j < len(lines) and not lines[j].startswith("```"):
                j += 1
            out.append("<pre>" + html.escape("\n".join(lines[i + 1 : j])) + "</pre>")
            i = j + 1
            continue
        m = re.match(r"(#{1,6})\s+(.*)", line)
        if m:
            flush()
            n = len(m.group(1))
            out.append(f"<h{n}>{_inline(m.group(2))}</h{n}>")
        elif line.startswith("|"):
            flush()
            rows = []
            while i < len(lines) and lines[i].startswith("|"):
                rows.append([c.strip() for c in lines[i].strip().strip("|").split("|")])
                i += 1
            body = [r for r in rows[1:] if not all(set(c) <= set("-: ") for c in r)]
            out.append(
                "<table><tr>"
                + "".join(f"<th>{_inline(c)}</th>" for c in rows[0])
                + "</tr>"
                + "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in r) + "</tr>" for r in body)
                + "</table>"
            )
            continue
        elif re.match(r"\s*([-*]|\d+\.)\s", line):
            flush()
            items = []
            while i < len(lines) and lines[i].strip():
                if re.match(r"\s*([-*]|\d+\.)\s", lines[i]):
                    items.append(re.sub(r"^\s*([-*]|\d+\.)\s", "", lines[i]))
                else:
                    items[-1] += " " + lines[i].strip()
                i += 1
            out.append("<ul>" + "".join(f"<li>{_inline(t)}</li>" for t in items) + "</ul>")
            continue
        elif not line.strip():
            flush()
        else:
            para.append(line.strip())
        i += 1
    flush()
    return "\n".join(out)


def _first_table(report: str) -> str | None:
    """The first Markdown table of a report (its header, rule and rows), or None."""
    lines = report.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("|") and i + 1 < len(lines) and set(lines[i + 1].replace("|", "").strip()) <= set("-: "):
            j = i
            while j < len(lines) and lines[j].startswith("|"):
                j += 1
            return "\n".join(lines[i:j])
    return None


def _page(title: str, body: str) -> bytes:
    return (
        f'<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{_CSS}</style></head><body>{body}</body></html>\n"
    ).encode()


def _verdict_span(verdict: str) -> str:
    return f'<span class="{verdict.replace(" ", "-")}">{verdict}</span>'


def build_site(results: list[PaperResult], out: str | Path) -> Path:
    """OUT/index.html (every paper's claim, verdicts and figure), OUT/NAME/index.html (its report),
    OUT/verdicts.json; figures are copied next to the pages that show them."""
    out = Path(out)
    rows = []
    for r in results:
        folder, page = Path(r.folder), out / r.name
        page.mkdir(parents=True, exist_ok=True)  # a paper with no figures (or no run yet) still gets its page
        if (folder / "figures").is_dir():
            dest = page / "figures"
            if dest.resolve() != (folder / "figures").resolve():
                shutil.rmtree(dest, ignore_errors=True)
                shutil.copytree(folder / "figures", dest)
        report = (folder / "report.md").read_text() if (folder / "report.md").is_file() else "*No report yet.*"
        banner = f'<p class="note">{html.escape(r.source)}; command: <code>{html.escape(r.command)}</code>'
        if r.shortened:
            banner += "; --quick shortened: " + html.escape("; ".join(r.shortened)) + " (the numbers are plumbing)"
        banner += ' — <a href="../index.html">all papers</a></p>'
        atomic_write_bytes(page / "index.html", _page(r.title, banner + markdown_to_html(report)))
        counts = r.counts()
        summary = ", ".join(f"{n} {v}" for v, n in counts.items() if n)
        claims = "".join(
            f"<li>{_verdict_span(c.verdict)}: <strong>{_inline(c.claim)}</strong> "
            f'<span class="note">{_inline(c.numbers[:400] + ("..." if len(c.numbers) > 400 else ""))}</span></li>'
            for c in r.claims
            if c.verdict != "measured"
        )
        figure = f'<img class="thumb" src="{r.name}/{r.figure}" alt="{r.name}">' if r.figure else ""
        table = _first_table(report)
        if table:
            claims += f"<details><summary>the report's first table</summary>{markdown_to_html(table)}</details>"
        source = html.escape(r.source) + (
            "<br>shortened: " + html.escape("; ".join(r.shortened)) if r.shortened else ""
        )
        rows.append(
            f'<tr class="paper"><td><a href="{r.name}/index.html"><strong>{html.escape(r.title)}</strong></a><br>'
            f"{html.escape(r.claim)}</td><td>{html.escape(summary) or 'no verdicts yet'}<ul>{claims}</ul></td>"
            f"<td>{figure}</td><td><code>{html.escape(r.command)}</code><br>"
            f'<span class="note">{source}</span></td></tr>'
        )
    body = (
        "<h1>difflab: the reading list, reproduced</h1><p>Each paper's claim, what we measured and our verdict "
        "(holds / partly / does not hold), read from the paper's report; click a paper for its tables and "
        "figures. Papers not rerun show their committed full run.</p>"
        "<table><tr><th>paper and claim</th><th>verdicts, with the numbers that decide them</th>"
        "<th>figure</th><th>command</th></tr>" + "".join(rows) + "</table>"
    )
    atomic_write_bytes(out / "index.html", _page("difflab: reproduced", body))
    table = [{**asdict(r), "counts": r.counts()} for r in results]
    atomic_write_bytes(out / "verdicts.json", (json.dumps(table, indent=1) + "\n").encode())
    return out / "index.html"


# --------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------


def _cmd_reproduce(args: argparse.Namespace) -> int:
    all_papers = papers()
    if args.list:
        for name, paper in all_papers.items():
            report = paper.folder / "report.md"
            counts = _result(paper, paper.folder, "committed full run").counts() if report.is_file() else {}
            summary = ", ".join(f"{n} {v}" for v, n in counts.items() if n and v != "measured") or "no verdicts yet"
            print(f"{name:14s} {paper.title}\n{'':14s} claim: {paper.claim}\n{'':14s} committed: {summary}")
        return 0
    if not args.paper:
        raise ValueError("name a paper (or all), or pass --list; known: " + ", ".join(all_papers))
    names = list(all_papers) if args.paper == ["all"] else args.paper
    results = reproduce(
        names,
        quick=args.quick,
        out=args.out,
        rerun=not args.show,
        seed=args.seed,
        paper_args=shlex.split(args.paper_args or ""),
        device=args.device,
        dtype=args.dtype,
    )
    index = Path(args.out) / "index.html"
    for r in results:
        if r.name in names:
            counts = ", ".join(f"{n} {v}" for v, n in r.counts().items() if n)
            print(f"{r.name}: {counts or 'no claims'} ({r.source})")
    print(f"wrote {index}")
    return 0


def add_reproduce_parser(subparsers) -> argparse.ArgumentParser:
    r = subparsers.add_parser(
        "reproduce",
        help="rerun papers' experiments and write a site of claims and verdicts",
        description=__doc__.split("\n\n")[0] + " Papers: papers/NAME/run.py; see `--list`.",
    )
    r.add_argument("paper", nargs="*", help="paper names (see --list), or all")
    r.add_argument("--list", action="store_true", help="list the papers, their claims and committed verdicts")
    r.add_argument(
        "--quick",
        action="store_true",
        help="the papers' QUICK settings (at most 10 CPU-minutes each; the site says what was shortened)",
    )
    r.add_argument("--show", action="store_true", help="rerun nothing: the site from the committed full runs")
    r.add_argument("--out", default="reproduce_out", help="site folder (default reproduce_out)")
    r.add_argument("--seed", type=SEED, default=0, help="seed of the reruns (default 0)")
    add_device_arguments(r)  # where the papers' pretrained pipelines run
    r.add_argument(
        "--paper-args",
        metavar="FLAGS",
        help='flags passed on to each rerun paper, e.g. "--only oracle --toys swiss_roll" '
        "(see python -m papers.NAME.run --help)",
    )
    r.set_defaults(func=_cmd_reproduce)
    return r
