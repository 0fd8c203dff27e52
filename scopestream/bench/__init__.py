"""Benchmarks of scopestream: timings as JSON, with baselines measured in the same run.

Each module holds one ``scopestream bench …`` command (STYLE 12: benchmarks are
not tests; they print JSON and compare ratios measured in one run):

* `scopestream.bench.streaming`: ring buffer + `ZarrSink` vs the tensorstore and file ceilings;
* `scopestream.bench.acquisition`: simulator frame rate and the acquisition callback's cost;
* `scopestream.bench.inference`: Mpx/s per backend, model and size, vs eager torch fp32;
* `scopestream.bench.viewer`: the live napari display under a fast stream (Qt, imported lazily);
* `scopestream.bench.positions`: 16 fields × 100 time points vs one field's as many frames;
* `scopestream.bench.long_run`: a long open-ended recording: memory, metadata size, fps;
* `scopestream.bench.common`: the frames, memory sampler and writer ceiling they share.

Nothing is imported here, so importing one benchmark never pulls in another's
dependencies (torch, napari).
"""

from __future__ import annotations
