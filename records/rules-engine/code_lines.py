"""Code lines of modules, docstrings, comments and blank lines aside (the measure of the rules and
engine issue's table). Usage: ``python code_lines.py FILE...``."""
import ast
import io
import sys
import tokenize


def code_lines(path):
    source = open(path).read()
    skip = set()
    for node in ast.walk(ast.parse(source)):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant) and isinstance(body[0].value.value, str):
            skip.update(range(body[0].lineno, body[0].end_lineno + 1))
    lines = set()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type in (tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER):
            continue
        for line in range(tok.start[0], tok.end[0] + 1):
            if line not in skip:
                lines.add(line)
    return len(lines)


if __name__ == "__main__":
    for path in sys.argv[1:]:
        print(f"{code_lines(path):5d}  {path}")
