"""actors: the Ray actors that wrap the pipeline's stages, their wiring, and `actors.runner.run`.

`actors.runner.run(config, output, ...)` runs the pipeline on an already initialised Ray (tests,
notebooks); ``run_pipeline.py`` is the command line around it. The package imports nothing itself,
so a source or sink worker loads only the modules its actor needs.

| module | what it holds |
|---|---|
| `runner`, `loop` | `run` (start and close a run), the driver loop (`Loop`) |
| `resume` | what the loop gives up and decodes again when a pool or a node with windows is lost |
| `streams` | `StreamStatus`, one stream's record and its states (`StreamState`), `RunSummary`, `RunningPipeline` |
| `plan` | Ray resources per actor, what the sources ship of a window |
| `source_pool`, `model`, `sink`, `distill` | the actors (a source pool hosts many streams) |
| `source` | one stream's source inside a pool, `SourceEvent`, `ErrorRecord` |
| `pools`, `assign`, `restarts` | the pools seen from the driver, rendezvous assignment, the restart budget |
| `results`, `predictor` | what the model hands the sink (torch-free), the model the model actor runs |
| `metrics`, `display`, `status` | ``pstream_*`` series, the terminal display, the status line and endpoints logged |
| `signals`, `processes` | SIGINT / SIGTERM drain the run, actors' process ids |
| `bench`, `scale_bench` | ``run_pipeline.py bench`` and ``bench --streams`` |
"""
