"""Suite-wide settings: no MLflow telemetry, no Ray usage stats, and no implicit ``ray.init()`` from
library background threads (a Serve handle's metrics thread left from one test would otherwise reconnect
to Ray while the next test starts its own cluster)."""

import os

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ["RAY_ENABLE_AUTO_CONNECT"] = "0"
