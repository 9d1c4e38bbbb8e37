"""The columnar path against the per-event path, in-process (no Kafka): decode only, hashed
LR learn only, and decode + learn, in events per CPU-second (medians; both paths in
every run, taken in turn, so a busy machine hits both alike).

    PYTHONPATH=. .venv/bin/python benchmarks/bench_columns.py --events 60000 --runs 5
"""
import argparse
import os
import statistics
import time
import numpy as np
from streams.columns import decode_columns
from streams.events import encode_event, decode_events, Event
from streams.simulator import ClickSimulator, SimulatorConfig
from learners.base import event_to_x
from learners.linear import HashedLogisticRegression
from learners.evaluate import prequential_step
from learners.metrics import PrequentialMetrics
from streams.consumer import tune_gc
ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("--events", type=int, default=60000)
ap.add_argument("--runs", type=int, default=5)
ap.add_argument("--batch", type=int, default=1024)
args = ap.parse_args()
raws = [encode_event(e) for e in ClickSimulator(SimulatorConfig(seed=1)).events(max_events=args.events)]
B = args.batch
batches = [raws[i:i+B] for i in range(0, len(raws), B)]
tune_gc()
def old(lr):
    n = 0
    for b in batches:
        imps = [e for e in decode_events(b) if isinstance(e, Event) and e.kind == "impression"]
        prequential_step(lr, [event_to_x(e) for e in imps], np.array([e.label for e in imps]), PrequentialMetrics()); n += len(imps)
    return n
def new(lr):
    n = 0
    for b in batches:
        imps = decode_columns(b)[0].of_kind("impression")
        lr.predict_learn_columns(imps); n += len(imps)
    return n
# learn only (examples prebuilt vs columns prebuilt)
xs_b = []; cols_b = []
for b in batches:
    imps = [e for e in decode_events(b) if isinstance(e, Event) and e.kind == "impression"]
    xs_b.append(([event_to_x(e) for e in imps], np.array([e.label for e in imps])))
    cols_b.append(decode_columns(b)[0].of_kind("impression"))
def learn_old(lr):
    n=0
    for xs, ys in xs_b: lr.predict_learn_many(xs, ys); n += len(ys)
    return n
def learn_new(lr):
    n=0
    for c in cols_b: lr.predict_learn_columns(c); n += len(c)
    return n
def dec_old(_):
    for b in batches: decode_events(b)
    return len(raws)
def dec_new(_):
    for b in batches: decode_columns(b)
    return len(raws)
print(f"load {os.getloadavg()} events {len(raws)} batch {B} bits 20 default crosses runs {args.runs}")
res = {f.__name__: [] for f in (dec_old, dec_new, learn_old, learn_new, old, new)}
for r in range(args.runs):
    for f in (dec_old, dec_new, learn_old, learn_new, old, new):
        lr = HashedLogisticRegression(bits=20)
        t = time.process_time(); n = f(lr); res[f.__name__].append(n / (time.process_time() - t))
for k, v in res.items():
    print(f"{k:10s} median {statistics.median(v)/1e3:7.0f}k events per CPU-s  runs {[round(x/1e3) for x in v]}")
