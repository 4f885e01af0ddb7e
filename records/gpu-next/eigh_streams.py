"""Sketchy's GPU cost is cuSOLVER syevd run matrix after matrix. Does splitting a stack over threads, each with its
own CUDA stream, overlap them? A stack of 22 symmetric 768x768 float64 matrices (the reference GPT's incremental
cores) and 12 of 512x512: one torch.linalg.eigh call against T threads on T streams, median of 5 (synchronised)."""
import threading, time, torch
def timed(fn, reps=5):
    ts = []
    for _ in range(reps):
        torch.cuda.synchronize(); t = time.perf_counter(); fn(); torch.cuda.synchronize(); ts.append(time.perf_counter() - t)
    return sorted(ts)[len(ts) // 2] * 1e3
for b, n, dt in ((22, 768, torch.float64), (12, 512, torch.float64), (22, 768, torch.float32), (22, 288, torch.float64)):
    g = torch.randn(b, n, n + 8, device="cuda", dtype=dt); a = g @ g.mT
    one = timed(lambda: torch.linalg.eigh(a))
    row = f"eigh ({b},{n},{n}) {str(dt)[6:]}: one call {one:.1f} ms ({one / b:.2f} ms/matrix)"
    for t in (2, 4, 8):
        streams = [torch.cuda.Stream() for _ in range(t)]; parts = list(torch.chunk(a, t))
        def work(i):
            with torch.cuda.stream(streams[i]):
                torch.linalg.eigh(parts[i])
            streams[i].synchronize()
        def run():
            ths = [threading.Thread(target=work, args=(i,)) for i in range(len(parts))]
            [x.start() for x in ths]; [x.join() for x in ths]
        run()
        row += f" | {t} streams {timed(run):.1f} ms"
    print(row, flush=True)
