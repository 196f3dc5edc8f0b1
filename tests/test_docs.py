"""The documentation against the code: docs/options.md as generated and as --help prints it."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from balancer import docgen

pytestmark = pytest.mark.timeout(60)
REPO = Path(__file__).resolve().parent.parent


def cli_help(*args: str) -> str:
    """What the real CLI prints for --help, unwrapped (COLUMNS), whitespace folded."""
    r = subprocess.run([sys.executable, "-m", "balancer", *args, "--help"], capture_output=True, text=True,
                       timeout=30, env={**os.environ, "COLUMNS": "10000"})
    assert r.returncode == 0, r.stderr
    return " ".join(r.stdout.split())


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
    for command in ("reload", "scale", "stop", "status"):
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
