import atexit, os, sys, time, resource, json
_t0 = time.time()
def _log():
    try:
        r = resource.getrusage(resource.RUSAGE_SELF)
        c = resource.getrusage(resource.RUSAGE_CHILDREN)
        with open("/tmp/sitec/procs.jsonl", "a") as f:
            f.write(json.dumps({"pid": os.getpid(), "ppid": os.getppid(), "argv": sys.argv[:4], "wall": time.time() - _t0,
                                "cpu": r.ru_utime + r.ru_stime, "children_cpu": c.ru_utime + c.ru_stime,
                                "mods": len(sys.modules), "torch": "torch" in sys.modules, "jax": "jax" in sys.modules}) + "\n")
    except Exception:
        pass
atexit.register(_log)
