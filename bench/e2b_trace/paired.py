"""Paired before/after comparison of an e2b_ab.py --json file: medians, p10, min and the
median of per-round differences with a 95 % bootstrap interval.

    python3 bench/e2b_trace/paired.py ab.json before after
"""
import json, sys, random
d = json.load(open(sys.argv[1])); a, b = sys.argv[2], sys.argv[3]
rows = []
for k in d:
    n, r = k.split("|", 1)
    if n == a and r not in rows: rows.append(r)
random.seed(1)
def med(x): x = sorted(x); m = len(x); return x[m//2] if m % 2 else (x[m//2-1]+x[m//2])/2
def pct(x, p): x = sorted(x); return x[min(len(x)-1, int(p*len(x)))]
print(f"| row | {a} p50 (p10, min) | {b} p50 (p10, min) | {b} − {a} (median of paired differences, 95% CI) |")
print("|---|---:|---:|---:|")
for r in rows:
    xa, xb = d.get(f"{a}|{r}"), d.get(f"{b}|{r}")
    if not xa or not xb: continue
    diffs = [y - x for x, y in zip(xa, xb)]
    bs = sorted(med(random.choices(diffs, k=len(diffs))) for _ in range(2000))
    f = lambda v: f"{v*1e3:.2f}"
    print(f"| {r.strip()} (n={len(diffs)}) | {f(med(xa))} ({f(pct(xa,.1))}, {f(min(xa))}) ms | {f(med(xb))} ({f(pct(xb,.1))}, {f(min(xb))}) ms | {med(diffs)*1e3:+.2f} ms [{bs[50]*1e3:+.2f}, {bs[1950]*1e3:+.2f}] |")
