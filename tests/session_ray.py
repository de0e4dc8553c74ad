"""How the suite's one local Ray is started (the ``ray_session`` fixture in conftest.py); a module
that needs another cluster (tests/actors/test_multinode.py) shuts it down and starts it again
with these arguments."""

SESSION_RAY = {"address": "local", "num_cpus": 2, "include_dashboard": False, "log_to_driver": False}
