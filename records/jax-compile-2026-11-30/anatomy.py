"""Where a method's lowered update is large: `python anatomy.py SIZE METHOD [OUT.mlir]` lowers the jitted
optax update as compile_step.py does (AS_GPU=1 as there) and prints the size of each private function,
the ops inside each lax.cond's branches, the custom calls, and the bytes of literal constants."""
import collections
import re
import sys
import time

from update_case import case

update, arguments = case(sys.argv[1], sys.argv[2])
t0 = time.process_time()
text = update.lower(*arguments).as_text()
print(f"lower {time.process_time() - t0:.1f} cpu s, {len(text)} chars, {text.count(chr(10))} lines")
if len(sys.argv) > 3:
    open(sys.argv[3], "w").write(text)
funcs = re.split(r"\n  func\.func ", text)
sizes = []
for f in funcs[1:]:
    name = re.match(r"(?:private |public )?@([\w.$-]+)", f)
    sizes.append((f.count("\n"), name.group(1) if name else "?"))
names = collections.Counter(re.sub(r"_\d+$", "", n) for _, n in sizes)
print("functions by name:", names.most_common(25))
print("largest functions:", sorted(sizes, reverse=True)[:15])
print("custom calls:", collections.Counter(re.findall(r"custom_call @(\w+)", text)).most_common())
consts = re.findall(r"stablehlo\.constant dense<(.{0,60000}?)> : tensor<([^>]*)>", text)
big = sorted(((len(v), t) for v, t in consts), reverse=True)[:10]
print("constants:", len(consts), "chars", sum(len(v) for v, _ in consts), "largest:", big)
print("dtypes f64 mentions:", text.count("f64"), " bf16:", text.count("bf16"))
