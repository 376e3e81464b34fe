"""The docs stay true: every `scdd-ray` command line in README.md and docs/*.md parses with the real
command-line parser, every relative link resolves, the front page stays a front page, and every current
result JSON names the command that made it."""
import argparse
import contextlib
import functools
import glob
import io
import json
import os
import re
import shlex

import pytest

from scdd_ray.cli import UsageError, build_parser

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GUIDE = [os.path.join(ROOT, "README.md")] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))
RESULT_PAGES = [os.path.join(ROOT, "benchmarks", "RESULTS.md")] + sorted(
    glob.glob(os.path.join(ROOT, "benchmarks", "results", "**", "*.md"), recursive=True))
FENCE = re.compile(r"^```([^\n]*)\n(.*?)^```", re.S | re.M)
SHELL = ("", "bash", "sh", "shell", "console")
ENV = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
# A value a reader fills in: DIR, OUT.json, HEAD_IP:6379, $OUT/x, A.pt ... (capitals, a shell variable,
# an ellipsis); any string where a path or name is expected, a sample value where a number is.
PLACEHOLDER = re.compile(r"(^|[/=])[A-Z][A-Z0-9_]*([./:]|$)|\$|\.\.\.")


def rel(path):
    return os.path.relpath(path, ROOT)


def command_lines(text: str) -> list[str]:
    """The `scdd-ray ...` lines of the fenced code blocks, `\\` continuations joined, comments dropped."""
    found = []
    for lang, block in FENCE.findall(text):
        if lang.strip() not in SHELL:
            continue
        logical = re.sub(r"\\\n\s*", " ", block)
        for line in logical.splitlines():
            if "scdd-ray" not in line:
                continue
            try:
                words = shlex.split(line, comments=True)
            except ValueError:  # unbalanced quotes: kept whole, so that the parse test names the line
                found.append(line.strip())
                continue
            while words and ENV.match(words[0]):  # OMP_NUM_THREADS=1 scdd-ray ...
                words = words[1:]
            if words and words[0] == "scdd-ray":
                found.append(shlex.join(words))
    return found


def _subparser(parsers: dict, words: list[str]):
    name = " ".join(words[:2]) if words and words[0] == "bench" else (words[0] if words else "")
    return parsers.get(name)


def _fill(action, token: str) -> str:
    """A value of the option's own type in place of a placeholder (a string stays as it is)."""
    if action is None or action.nargs == 0:
        return token
    if action.choices:
        return next(iter(action.choices))
    if action.type is None or action.type is str:
        return token
    for sample in ("1", "1.0", "0.5,1.0", "1,2", "x"):
        try:
            action.type(sample)
            return sample
        except (ValueError, TypeError, argparse.ArgumentTypeError):
            continue
    return token


@functools.lru_cache(maxsize=1)
def _parser():
    return build_parser()  # parsing does not change a parser: one serves every line


def parse_command(line: str) -> None:
    """Parse one documented line with the CLI's own parser; UsageError names what is wrong."""
    parser, parsers = _parser()
    words = shlex.split(line)[1:]
    while words[:1] in (["-q"], ["--quiet"]):
        words = words[1:]
    sub = _subparser(parsers, words)
    if sub is None:
        raise UsageError(f"unknown command in {line!r}")
    filled, previous = [], None
    for w in words:
        if w.startswith("-"):
            flag = w.split("=", 1)[0]
            if flag not in sub._option_string_actions:  # argparse would take a prefix: docs name flags in full
                raise UsageError(f"unrecognized argument: {flag}")
            previous = sub._option_string_actions[flag]
            filled.append(w)
        else:
            filled.append(_fill(previous, w) if PLACEHOLDER.search(w) else w)
            previous = previous if previous is not None and previous.nargs in ("+", "*") else None
    with contextlib.redirect_stdout(io.StringIO()):
        try:
            parser.parse_args(filled)
        except SystemExit as e:  # --help prints and exits 0
            if e.code:
                raise UsageError(f"exit {e.code}") from None


def _documented():
    for path in GUIDE:
        with open(path) as f:
            for line in command_lines(f.read()):
                yield pytest.param(line, id=f"{rel(path)}: {line[:70]}")


def test_the_guide_documents_commands():
    lines = [p.values[0] for p in _documented()]
    assert len(lines) >= 30  # the extraction finds the guide's commands, not nothing
    assert "scdd-ray distill --dataset digits --out runs/digits-scdd" in lines


@pytest.mark.parametrize("line", list(_documented()))
def test_every_documented_command_parses(line):
    try:
        parse_command(line)
    except UsageError as e:
        pytest.fail(f"{line}\n  scdd-ray: error: {e}")


def _inline_flags(text: str) -> set[str]:
    """Flags a page names in inline code (`--teacher-bn train`), outside fenced blocks."""
    return {m.split("=")[0] for m in re.findall(r"`(--[a-z][a-z0-9-]*)[^`]*`", FENCE.sub("", text))}


def _all_flags() -> set[str]:
    parser, parsers = _parser()
    return {o for p in [parser, *parsers.values()] for o in p._option_string_actions}


@pytest.mark.parametrize("path", GUIDE, ids=rel)
def test_every_flag_named_in_prose_exists(path):
    with open(path) as f:
        named = _inline_flags(f.read())
    unknown = sorted(named - _all_flags() - {"--x-y"})  # configuration.md: the naming rule, not a flag
    assert not unknown, f"{rel(path)} names flags no command has: {unknown}"


def test_a_renamed_flag_in_prose_is_found():
    assert _inline_flags("use `--teacher-bnn train` or `--iterations 100`\n```\n`--x`\n```\n") == {
        "--teacher-bnn", "--iterations"}
    assert "--teacher-bnn" not in _all_flags() and "--iterations" in _all_flags()


@pytest.mark.parametrize("line", [
    "scdd-ray distill --datasett digits --out runs/x",          # a renamed flag
    "scdd-ray distill --dataset digits --ipc ten --out runs/x",  # a value of the wrong type
    "scdd-ray distill --dataset digits --bn-coeff 0.1 --out DIR",  # a misspelt flag
    "scdd-ray bench tables --dataset digits --work DIR",        # a renamed command
    "scdd-ray posttrain --distilled DIR --teacher FILE --posttrain-worker 2 --out OUT",  # abbreviation of none
])
def test_a_wrong_line_fails_the_check(line):
    with pytest.raises(UsageError):
        parse_command(line)


def test_extraction_joins_continuations_and_drops_comments_and_env():
    text = ("text `scdd-ray not --a-block`\n```bash\n# a comment\nOMP_NUM_THREADS=1 scdd-ray distill --dataset digits \\\n"
            "    --ipc 1 --out runs/x   # why\npython other.py\n```\n")
    assert command_lines(text) == ["scdd-ray distill --dataset digits --ipc 1 --out runs/x"]


def test_placeholders_take_a_value_of_the_options_type():
    parse_command("scdd-ray distill --dataset parquet --data-dir DIR --ipc K --seed N --out OUT")
    parse_command("scdd-ray bench table --dataset digits --ipcs IPCS --seeds 0,1 --work $WORK --json OUT.json")


# --- links --------------------------------------------------------------------------------------

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: str) -> set[str]:
    with open(path) as f:
        text = FENCE.sub("", f.read())
    return {slug(m) for m in re.findall(r"^#+\s+(.*)$", text, re.M)}


def links(path: str) -> list[str]:
    with open(path) as f:
        text = FENCE.sub("", f.read())
    return [t for t in LINK.findall(text) if not re.match(r"[a-z]+:", t)]


@pytest.mark.parametrize("path", GUIDE + RESULT_PAGES, ids=rel)
def test_every_relative_link_resolves(path):
    bad = []
    for target in links(path):
        file, _, anchor = target.partition("#")
        dest = os.path.normpath(os.path.join(os.path.dirname(path), file)) if file else path
        if not os.path.exists(dest):
            bad.append(f"{target} (no {rel(dest)})")
        elif anchor and dest.endswith(".md") and anchor not in anchors(dest):
            bad.append(f"{target} (no heading #{anchor} in {rel(dest)})")
    assert not bad, f"{rel(path)}: broken links: {bad}"


def test_a_broken_link_is_found(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# Title\n[ok](page.md#title) [gone](missing.md) [anchor](page.md#nope) [web](https://x.org)\n")
    found = [t for t in links(str(page))]
    assert found == ["page.md#title", "missing.md", "page.md#nope"]
    with pytest.raises(AssertionError, match=r"missing\.md.*#nope"):
        test_every_relative_link_resolves(str(page))


# --- the front page and the results -----------------------------------------------------------

def test_readme_is_a_front_page():
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    assert len(text.splitlines()) <= 150
    for line in ("python3 -m venv .venv && . .venv/bin/activate", 'pip install -e ".[dev]"', "pytest -q",
                 "scdd-ray distill --dataset digits --out runs/digits-scdd"):
        assert line in text
    guide = {os.path.normpath(t.partition("#")[0]) for t in links(os.path.join(ROOT, "README.md"))}
    assert len({g for g in guide if g.startswith("docs")}) >= 5  # the front page leads to the guide


def test_every_current_result_json_names_its_command():
    results = os.path.join(ROOT, "benchmarks", "results")
    files = [f for f in glob.glob(os.path.join(results, "**", "*.json"), recursive=True)
             if os.sep + "archive" + os.sep not in f]
    assert files
    missing = []
    for f in files:
        with open(f) as fh:
            data = json.load(fh)
        if not (isinstance(data, dict) and isinstance(data.get("command"), str) and data["command"].strip()):
            missing.append(rel(f))
    assert not missing, f"result JSON without a `command`: {missing}"
    assert not glob.glob(os.path.join(ROOT, "benchmarks", "*.json")), "results belong under benchmarks/results/"
