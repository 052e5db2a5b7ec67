"""`difflab reproduce`: the paper list, one paper's --quick path on a tiny budget, and the site's
verdict table (checked against the claims in the reports it was built from)."""

import json

import pytest

from difflab.cli import main
from difflab.reproduce import Claim, markdown_to_html, papers, read_claims, shortened
from papers.runner import PAPERS_DIR

REPORT = """# A paper

## Claims, measured

- **A rises with w.** 0: 0.1, 1: 0.3; holds, monotonically (noise 0.05).
- **B falls with w.** 0: 0.5, 1: 0.5; does not hold (no change beyond noise).
- **C rises overall.** holds as a trend but not monotonically.
- **D, in two parts.** first -- holds, monotonically; second -- does not hold
  (no change beyond noise).
- **E is measured.** 0.52 at n = 100.

## 1. Details

- **Not a claim.** holds.
"""


def test_claims_and_verdicts_are_read_from_the_claims_section():
    claims = read_claims(REPORT)
    assert [(c.claim, c.verdict) for c in claims] == [
        ("A rises with w", "holds"),
        ("B falls with w", "does not hold"),
        ("C rises overall", "partly"),
        ("D, in two parts", "partly"),
        ("E is measured", "measured"),
    ]
    assert claims[3].numbers.endswith("(no change beyond noise).")  # the bullet's continuation line


def test_list_names_every_paper_with_its_claim(capsys):
    assert main(["reproduce", "--list"]) == 0
    out = capsys.readouterr().out
    for name, paper in papers().items():
        assert name in out and paper.claim in out
        assert paper.title and paper.claim.endswith(".")


def test_one_paper_quick_on_a_tiny_budget_and_the_site(tmp_path, capsys):
    out = tmp_path / "site"
    args = [
        "reproduce",
        "theory",
        "--quick",
        "--device",
        "cpu",
        "--dtype",
        "bf16",
        "--out",
        str(out),
        "--paper-args",
        "--only oracle --toys swiss_roll",
    ]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "theory: 1 holds" in printed and f"wrote {out / 'index.html'}" in printed
    rerun = out / "theory" / "run"
    assert (rerun / "results.json").exists() and (rerun / "report.md").exists()
    table = {row["name"]: row for row in json.loads((out / "verdicts.json").read_text())}
    assert set(table) == set(papers())
    theory = table["theory"]
    assert theory["source"] == "quick rerun" and theory["command"] == "difflab reproduce theory --quick"
    assert theory["shortened"] == shortened(papers()["theory"])
    want = read_claims((rerun / "report.md").read_text())
    assert [Claim(**c) for c in theory["claims"]] == want and want[0].verdict == "holds"
    # the papers not rerun show their committed full runs, with their own verdicts
    dit = table["dit"]
    assert dit["source"] == "committed full run" and dit["counts"]["partly"] == 1
    index = (out / "index.html").read_text()
    assert index.count('<tr class="paper">') == len(papers())
    assert '<span class="holds">holds</span>: <strong>Exact-ODE likelihood' in index
    assert (out / "dit" / "index.html").exists() and (out / "dit" / dit["figure"]).exists()
    assert '<img class="thumb" src="dit/figures/fd_vs_gflops.png"' in index
    with_tables = [
        n
        for n in papers()
        if n == "theory"
        or "|---" in ((PAPERS_DIR / n / "report.md").read_text() if (PAPERS_DIR / n / "report.md").is_file() else "")
    ]
    assert index.count("<details><summary>the report's first table</summary><table>") >= len(with_tables) - 1


def test_unknown_paper_and_no_paper_are_one_line_errors(tmp_path, capsys):
    assert main(["reproduce", "nope", "--out", str(tmp_path)]) == 2
    assert "unknown paper(s) ['nope']; known: adm, asyrp, ddim, ddpm, diffusionclip" in capsys.readouterr().err
    assert main(["reproduce", "--out", str(tmp_path)]) == 2
    assert "name a paper (or all), or pass --list" in capsys.readouterr().err


@pytest.mark.parametrize(
    "md, html",
    [
        ("# T\n\ntext **b** `c`", "<h1>T</h1>\n<p>text <strong>b</strong> <code>c</code></p>"),
        (
            "| a | b |\n|---|---|\n| 1 | 2 |",
            "<table><tr><th>a</th><th>b</th></tr><tr><td>1</td><td>2</td></tr></table>",
        ),
        ("![f](figures/x.png)", '<p><img src="figures/x.png" alt="f"></p>'),
        ("- one\n- two <3", "<ul><li>one</li><li>two &lt;3</li></ul>"),
    ],
)
def test_markdown_to_html(md, html):
    assert markdown_to_html(md) == html
