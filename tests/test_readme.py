"""The README quotes the code: every python block whose paragraph above links lines such as
[`consistency_loss`, adamix.py#L292-L295](adamix.py#L292-L295) must be those lines of that file,
so a change to the code that moves or edits a quoted line fails here until the README follows."""
import re

from conftest import ROOT

LINK = re.compile(r"\]\(([\w/.-]+\.py)#L(\d+)(?:-L(\d+))?\)")
BLOCK = re.compile(r"```python\n(.*?)```", re.S)


def quoted_blocks(text):
    """(code lines, {file: set of linked line numbers}) for every python block after its links."""
    start = 0
    for block in BLOCK.finditer(text):
        linked = {}
        paragraph = text[start:block.start()].rstrip().rsplit("\n\n", 1)[-1]  # the one above
        for path, a, b in LINK.findall(paragraph):
            linked.setdefault(path, set()).update(range(int(a), int(b or a) + 1))
        start = block.end()
        if linked:
            lines = [line.rstrip() for line in block[1].splitlines()]
            yield [line for line in lines if line.strip() not in ("", "...")], linked


def test_every_quoted_line_is_in_the_lines_the_readme_links():
    text = (ROOT / "README.md").read_text()
    blocks = list(quoted_blocks(text))
    assert len(blocks) >= 4  # the four equations
    for code, linked in blocks:
        available = {(ROOT / path).read_text().splitlines()[n - 1].rstrip()
                     for path, numbers in linked.items() for n in numbers}
        missing = [line for line in code if line not in available]
        assert not missing, f"not at the linked lines {linked}: {missing}"


def test_every_line_link_points_inside_its_file():
    for page in [ROOT / "README.md", *(ROOT / "docs").glob("*.md"), ROOT / "results" / "README.md"]:
        for path, a, b in LINK.findall(page.read_text()):
            target = (page.parent / path) if (page.parent / path).exists() else ROOT / path
            n = len(target.read_text().splitlines())
            assert 1 <= int(a) <= int(b or a) <= n, f"{page.name}: {path}#L{a}-L{b} ({n} lines)"
