import gc, time

from stepped import stepped_optimizer

name, opt = stepped_optimizer()
for dis in (False, True, False, True):
    gc.collect()
    if dis: gc.disable()
    t = time.perf_counter()
    for _ in range(10): opt.step()
    dt = (time.perf_counter() - t) / 10 * 1e3
    gc.enable()
    print(name, "gc off" if dis else "gc on ", f"{dt:.1f} ms/step", gc.get_count())
