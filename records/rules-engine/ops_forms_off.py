"""Operations a step issues with one family of fast forms switched off: ``python ops_forms_off.py views|joins|pack|packleafwise [cpu|gpu] [method,...]``
(results: ops_forms_off.txt)."""
import sys, runpy
which = sys.argv.pop(1)
import precond_ref._backend as b
import precond_ref.engine.run as run
import precond_ref.engine.matrices as matrices
import precond_ref.engine.joined as joined
if which == "views":
    b.consecutive_view = lambda arrays, new_axis: None
elif which == "joins":
    matrices.plain = lambda: True
elif which == "pack":
    run.pack = lambda *a, **k: None
elif which == "packleafwise":
    joined.plain = lambda: True
sys.argv = ["ops.py"] + sys.argv[1:]
runpy.run_path("records/rules-engine/ops.py", run_name="__main__")
