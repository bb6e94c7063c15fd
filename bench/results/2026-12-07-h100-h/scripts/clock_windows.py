"""The SM clock, power and clock-event reasons nvidia-smi logged (every 200 ms) during each form's do_bench
window of ``diag3.py``: medians over the samples with the GPU busy (utilization > 50%).
Usage: python clock_windows.py clocks_call2.csv diag3_call2.log"""

import csv
import datetime as dt
import re
import statistics as st
import sys


def num(text):
    return float(re.sub(r"[^0-9.]", "", text) or "nan")


samples = []
with open(sys.argv[1]) as f:
    rows = list(csv.reader(f))
with open(sys.argv[2]) as f:
    log = f.read().splitlines()
for r in rows:
    if r[0].startswith("timestamp"):
        continue
    t = dt.datetime.strptime(r[0].strip(), "%Y/%m/%d %H:%M:%S.%f").time()
    samples.append((t, num(r[1]), num(r[3]), num(r[5]), r[6].strip()))
windows = {}
for line in log:
    m = re.match(r"window (.*): (\S+) \.\. (\S+)", line)
    if m:
        a, b = (dt.datetime.strptime(x, "%H:%M:%S.%f").time() for x in m.groups()[1:])
        windows.setdefault(m.group(1), []).extend(s for s in samples if a <= s[0] <= b and s[3] > 50)
for k, sel in windows.items():
    sm, power = st.median(s[1] for s in sel), st.median(s[2] for s in sel)
    print(f"{k:30s} n={len(sel):3d} SM {sm:5.0f} MHz, {power:4.0f} W, reasons {sorted({s[4] for s in sel})}")
