import gc, time

from stepped import stepped_optimizer

name, opt = stepped_optimizer()
stats = {0: [0, 0.0], 1: [0, 0.0], 2: [0, 0.0]}; t0 = [0]
def cb(phase, info):
    if phase == "start": t0[0] = time.perf_counter()
    else: s = stats[info["generation"]]; s[0] += 1; s[1] += time.perf_counter() - t0[0]
gc.callbacks.append(cb)
t = time.perf_counter()
for _ in range(10): opt.step()
print(name, f"{(time.perf_counter()-t)/10*1e3:.1f} ms/step", {g: (n, round(s*1e3/10, 2)) for g, (n, s) in stats.items()}, "objects", len(gc.get_objects()))
