"""Where MBF's capture fails on the reference GPT (bench settings): the traceback of the failed capture,
then the first host synchronisation of an uncaptured step under torch.cuda.set_sync_debug_mode("error")."""
import traceback, torch
from precond_ref.adapters import _torch_capture
from precond_ref.benchmarks.models import SIZES, build_torch, random_batches, torch_loss
from precond_ref.benchmarks.common import contenders, update_extra, torch_optimizer

orig = _torch_capture.Captures._warn
def warn(self, reason, failure=False):
    traceback.print_exc()
    orig(self, reason, failure)
_torch_capture.Captures._warn = warn
size = SIZES["gpt"]["reference"]
(c,), _ = contenders("mbf", False)
for capture in (True, False):
    torch.manual_seed(0)
    module = build_torch("gpt", size, torch.float32, "cuda")
    named = list(module.named_parameters())
    opt, _ = torch_optimizer(c, named, "default")
    opt._capture = capture if capture else False
    batches, loss_fn = random_batches("gpt", size, "cuda", torch.float32), torch_loss("gpt")
    for i in range(205):
        opt.zero_grad(set_to_none=True)
        loss_fn(module, *batches[i % len(batches)]).backward()
        if not capture and i >= 2:
            torch.cuda.set_sync_debug_mode("error")
        try:
            opt.step()
        except Exception:
            print("step", i, "raised:"); traceback.print_exc(); break
        finally:
            torch.cuda.set_sync_debug_mode(0)
        if capture and _torch_capture.book(opt) is not None and _torch_capture.book(opt).off:
            print("capture off at step", i, _torch_capture.book(opt).off[:300]); break
    print("capture" if capture else "sync debug", "done at step", i, flush=True)
