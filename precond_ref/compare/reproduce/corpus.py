"""The char-LM experiments' text: this project's README.md and docs/**/*.md as of one commit,
frozen into ``corpus.txt.gz`` beside this module (package data, so that an installed package runs
``reproduce`` without the source tree).

Why frozen: the text was read from the working tree, which changes with every documentation
commit, so every char-LM number depended on the commit the command ran from, and an installed
package has no docs/ at all. The pinned commit is the one whose documentation the committed report
(``docs/reproduce.md``, ``records/reproduce.json``) was run on: its ``corpus_characters`` is this
text's length.

The rule, as the experiments used it: README.md, then every ``docs/**/*.md`` in path order, less
``docs/reproduce.md`` (the command's own output), joined by blank lines, with universal newlines.
``python -m precond_ref.compare.reproduce.corpus [REPOSITORY]`` writes the file again from git (to
change :data:`REVISION`, which changes every char-LM number: rerun ``reproduce --docs`` after).
"""

from __future__ import annotations

import gzip
import pathlib
import subprocess
import sys
from importlib import resources

__all__ = ["REVISION", "FILE", "EXCLUDE", "text", "from_git"]

#: The commit whose README.md and docs/ the text is (docs/reproduce.md's run: 127,945 characters).
REVISION = "da6673e5b42d13cdc5c96d8296afa3661efcbe1b"
#: The packaged file (gzip, UTF-8).
FILE = "corpus.txt.gz"
#: Left out: what the command itself writes (the text must not depend on the last run).
EXCLUDE = ("reproduce.md",)


def text() -> str:
    """The packaged text."""
    try:
        data = resources.files(__package__).joinpath(FILE).read_bytes()
    except FileNotFoundError:
        from ...cli import UserError

        raise UserError(f"the char-LM experiments' text {FILE} is missing from this installation of precond_ref "
                        "(package data): reinstall the package") from None
    return gzip.decompress(data).decode("utf-8")


def from_git(repository: str | pathlib.Path, revision: str = REVISION) -> str:
    """The text built by the rule above from ``revision`` of the git ``repository``."""

    def git(*args: str) -> bytes:
        return subprocess.run(["git", "-C", str(repository), *args], capture_output=True, check=True).stdout

    names = git("ls-tree", "-r", "--name-only", "-z", revision, "--", "README.md", "docs").decode("utf-8").split("\0")
    docs = sorted((pathlib.PurePosixPath(n) for n in names if n.startswith("docs/") and n.endswith(".md")))
    files = [p for p in [pathlib.PurePosixPath("README.md"), *docs] if p.name not in EXCLUDE]
    # Path.read_text's universal newlines, as the working-tree reader had them.
    read = (git("show", f"{revision}:{p}").decode("utf-8").replace("\r\n", "\n").replace("\r", "\n") for p in files)
    return "\n\n".join(read)


def _write(repository: str) -> None:
    """Writes ``FILE`` beside this module from :data:`REVISION` of ``repository`` (gzip without a
    timestamp: the same text gives the same bytes)."""
    data = gzip.compress(from_git(repository).encode("utf-8"), compresslevel=9, mtime=0)
    path = pathlib.Path(__file__).with_name(FILE)
    path.write_bytes(data)
    print(f"{path}: {len(data)} bytes, {len(text())} characters from {REVISION[:12]}")


if __name__ == "__main__":  # pragma: no cover
    _write(sys.argv[1] if len(sys.argv) > 1 else ".")
