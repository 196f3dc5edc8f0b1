"""The documentation against the code: docs/options.md as generated and as --help prints it, links that resolve,
a README a newcomer reads in five minutes, and the tested Pythons named alike everywhere.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from balancer import docgen

pytestmark = pytest.mark.timeout(60)
REPO = Path(__file__).resolve().parent.parent
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "tests" / "README.md",
         REPO / "bench" / "README.md", REPO / "grafana" / "README.md"]
LINK = re.compile(r"\]\(([^)\s]+)\)")
FENCE = re.compile(r"^\s*```")


def cli_help(*args: str) -> str:
    """What the real CLI prints for --help, unwrapped (COLUMNS), whitespace folded."""
    r = subprocess.run([sys.executable, "-m", "balancer", *args, "--help"], capture_output=True, text=True,
                       timeout=30, env={**os.environ, "COLUMNS": "10000"})
    assert r.returncode == 0, r.stderr
    return " ".join(r.stdout.split())


def section(text: str, heading: str) -> str:
    """The body of one '## heading' section of a Markdown page."""
    m = re.search(rf"^## {re.escape(heading)}\n(.*?)(?=^## |\Z)", text, re.S | re.M)
    assert m, f"no '## {heading}' section"
    return m.group(1)


def test_options_page_is_what_the_generator_makes():
    assert (REPO / "docs" / "options.md").read_text() == docgen.render(), \
        "docs/options.md differs from balancer/config.py: run python -m balancer.docgen and commit the page"


def test_options_page_has_every_flag_and_help_text_that_help_prints():
    page = (REPO / "docs" / "options.md").read_text()
    run_part, control_part = page.split("## Control commands", 1)
    shown = cli_help("run")
    assert set(re.findall(r"(?<![\w-])--[a-z][a-z-]+", shown)) - {"--help"} \
        == set(re.findall(r"`(--[a-z][a-z-]+)", run_part))
    from balancer.config import option_fields

    for f in option_fields():  # the words a user reads in --help are the words on the page
        words = " ".join(f.metadata["help"].replace("%%", "%").split())
        if f.name in docgen.MACHINE_HELP:
            words = words.split(docgen.MACHINE_HELP[f.name][0].strip(")"))[0]
        assert words in shown, f.name
        assert docgen.table_cell(words) in page, f.name
    from balancer.cli import CONTROL_COMMANDS

    for command in CONTROL_COMMANDS:
        flags = set(re.findall(r"(?<![\w-])--[a-z][a-z-]+", cli_help(command))) - {"--help"}
        part = control_part.split(f"### `balancer {command}`", 1)[1].split("###", 1)[0]
        assert flags == set(re.findall(r"`(--[a-z][a-z-]+)", part)), command


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2 or not shutil.which("taskset"),
                    reason="needs two CPUs and taskset to show another machine's CPU count")
def test_options_page_is_the_same_on_a_machine_with_fewer_cpus(tmp_path):
    # --workers defaults to the usable CPUs; generated on one CPU, the page must not change.
    out = tmp_path / "options.md"
    r = subprocess.run(["taskset", "-c", "0", sys.executable, "-m", "balancer.docgen", str(out)],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert out.read_text() == docgen.render()


def test_docgen_check_names_a_stale_page(tmp_path):
    page = tmp_path / "options.md"
    page.write_text(docgen.render().replace("--backlog", "--backlock"))
    r = subprocess.run([sys.executable, "-m", "balancer.docgen", "--check", str(page)], capture_output=True,
                       text=True, timeout=30)
    assert r.returncode == 1 and r.stderr == f"{page} is stale: run python -m balancer.docgen\n", r.stderr


def anchors(page: Path) -> set[str]:
    """GitHub's heading anchors of a Markdown page (code blocks skipped, repeats numbered)."""
    seen: dict[str, int] = {}
    fenced = False
    for line in page.read_text().splitlines():
        if FENCE.match(line):
            fenced = not fenced
        elif not fenced and (m := re.match(r"#{1,6} (.+)", line)):
            slug = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
            seen[slug] = seen.get(slug, -1) + 1
            if seen[slug]:
                seen[f"{slug}-{seen[slug]}"] = 0
    return set(seen)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_and_anchor_resolves(page):
    broken = []
    for target in LINK.findall(page.read_text()):
        if re.match(r"[a-z]+:", target):  # http(s), mailto: not checked offline
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(target)
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(target)
    assert not broken, broken


def test_readme_is_short_and_its_set_up_is_the_two_commands_ci_runs():
    text = (REPO / "README.md").read_text()
    assert len(text.splitlines()) <= 200
    blocks = re.findall(r"```sh\n(.*?)\n```", section(text, "Set up"), re.S)
    assert blocks == ["python3 -m venv .venv && .venv/bin/pip install . && .venv/bin/balancer",
                      "bash tests/run.sh"], blocks
    ci = REPO / ".ci" / "run"  # a checkout's CI entry point; an unpacked sdist has none
    assert not ci.exists() or ci.read_text().strip().endswith("\nbash tests/run.sh")


def test_tested_pythons_are_named_alike_in_the_classifiers_and_the_readme():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    classified = [c.rsplit(" ", 1)[1] for c in project["classifiers"]
                  if re.fullmatch(r"Programming Language :: Python :: 3\.\d+", c)]
    lowest = re.fullmatch(r">=(3\.\d+)", project["requires-python"]).group(1)
    assert classified and classified[0] == lowest, classified
    named = re.search(r"Tested on CPython ([\d., and]+?)(?:,|\s)+with", " ".join(
        (REPO / "README.md").read_text().split())).group(1)
    assert re.findall(r"3\.\d+", named) == classified, named
