#!/usr/bin/env bash
# Sixth GPU run, second call: the first call's bench.json files (left out: too many files under $OUT),
# then compiled ASGO alone on the reference GPT.
export PYTHONUNBUFFERED=1
find / -xdev -path '*/all/bench.json' -o -path '*/mbf_*/bench.json' 2>/dev/null | grep -v '^/proc' | head -20
for f in $(find / -xdev \( -path '*/all/bench.json' -o -path '*/mbf_new*/bench.json' -o -path '*/mbf_old*/bench.json' \) 2>/dev/null); do
  d=$(basename $(dirname $f)); cp $f "$OUT/${d}_bench.json"; done
ls "$OUT"
cd /tmp
PYTHONPATH=/tmp/site timeout ${1:-380} python3 -m precond_ref bench --model gpt --size reference --frameworks torch \
  --methods asgo --torch-compile on --budget 3 --out /tmp/compiled_asgo --no-progress > "$OUT/compiled_asgo.txt" 2>&1
echo "compiled rc $?"; grep "^| torch" "$OUT/compiled_asgo.txt"; cp /tmp/compiled_asgo/bench.json "$OUT/compiled_asgo_bench.json" 2>/dev/null; ls /tmp/compiled_asgo | head
