"""Container objects (tracked by the cyclic collector) that one eager step makes and that are still
alive after it, by type: what each step promotes towards the old generation (2 x 400 Linear(8, 8))."""
import collections, gc

from stepped import stepped_optimizer

name, opt = stepped_optimizer()
gc.collect(); gc.disable()
before = {id(o) for o in gc.get_objects()}
opt.step()
new = [o for o in gc.get_objects() if id(o) not in before]
gc.enable()
print(name, len(new), "per parameter:", round(len(new) / 800, 1), collections.Counter(type(o).__name__ for o in new).most_common(6))
