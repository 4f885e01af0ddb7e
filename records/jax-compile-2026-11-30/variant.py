"""compile_step.py with one form of the step swapped within the process (an experiment):
`python variant.py FORM SIZE METHODS`. FORM: eye_in_graph (sketch._eye's [I; 0] made in the traced
step, xp.eye, instead of a literal evaluated while tracing)."""
import runpy
import sys

form = sys.argv.pop(1)
if form == "eye_in_graph":
    import precond_ref.sketch as sk
    from precond_ref._backend import placement

    sk._eye = lambda xp, rows, columns, like: xp.eye(rows, columns, dtype=like.dtype, device=placement(xp, like))
else:
    raise SystemExit(f"unknown form {form}")
sys.argv[0] = sys.argv[0].replace("variant.py", "compile_step.py")
runpy.run_path(sys.argv[0], run_name="__main__")
