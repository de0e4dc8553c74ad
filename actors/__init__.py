"""actors: the Ray actors that wrap the pipeline's stages, their wiring, and `actors.runner.run`.

`actors.runner.run(config, output, ...)` runs the pipeline on an already initialised Ray (tests,
notebooks); ``run_pipeline.py`` is the command line around it. The package imports nothing itself,
so a source or sink worker loads only the modules its actor needs.

| module | what it holds |
|---|---|
| `runner` | `run`, the driver loop, `RunSummary`, `RunningPipeline` |
| `streams` | `StreamStatus`, one stream's record and its states (`StreamState`) |
| `plan` | Ray resources per actor, what the sources ship of a window |
| `source`, `model`, `sink`, `distill` | the actors |
| `predictor` | the model the model actor runs |
| `metrics`, `display`, `bench` | ``pstream_*`` series, the terminal display, ``run_pipeline.py bench`` |
"""
