"""A clean console: library warnings, log lines and progress bars that are not the user's business are
turned off where they start, in the driver and in every Ray worker.

The CLI calls ``configure(verbose)`` once; ``ray_runtime_env()`` is what ``ray.init`` passes so that each
worker process runs ``quiet_libraries`` before it imports anything (the hook is named by module path, so
an external cluster needs the project installed, or the job's ``working_dir``, to import it). With
``--verbose`` nothing is filtered anywhere. What stays on: the run's own stage progress bars, the eval
summary, and warnings and errors of this project and of Ray.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import logging
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from types import ModuleType

VERBOSE_ENV = "UNIGRPO_VERBOSE"
WORKER_SETUP_HOOK = "services.console.quiet_libraries"

# Libraries whose deprecation notices are about the project's own calls, not about the user's run.
LIBRARIES = ("transformers", "diffusers", "huggingface_hub", "deepspeed", "torch", "mlflow", "accelerate",
             "peft", "vllm", "safetensors", "tokenizers")
# Read at import: huggingface_hub's progress bars (and so transformers'), the libraries' log levels
# (MLflow's INFO lines: "Creating initial MLflow database tables", "Started monitoring system metrics").
QUIET_ENV = {"HF_HUB_DISABLE_PROGRESS_BARS": "1", "TRANSFORMERS_VERBOSITY": "error",
             "DIFFUSERS_VERBOSITY": "error", "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
             "MLFLOW_LOGGING_LEVEL": "WARNING"}
# Library loggers kept at WARNING and above (also when the library was imported first).
WARNING_LOGGERS = ("mlflow", "alembic", "httpx", "urllib3", "filelock")
# Loggers that also log routine notices at WARNING: only their errors pass.
ERROR_LOGGERS = ("DeepSpeed",)  # "Setting accelerator to CPU", ZeRO / engine setup notices
# Ray's notice that a new local cluster uses token authentication (the default, nothing to act on).
RAY_NOTICES = {"ray._private.authentication.authentication_token_setup": "Token authentication is enabled"}


def configure(verbose: bool) -> None:
    """This process and the Ray workers it starts: quiet (the default), or everything as the libraries
    print it (``--verbose``)."""
    if verbose:
        os.environ[VERBOSE_ENV] = "1"
    else:
        os.environ.pop(VERBOSE_ENV, None)
        quiet_libraries()


def is_verbose() -> bool:
    return os.environ.get(VERBOSE_ENV) == "1"


def ray_runtime_env() -> dict | None:
    """``ray.init(runtime_env=...)``: every worker process runs ``quiet_libraries`` at start (None when
    verbose)."""
    return None if is_verbose() else {"worker_process_setup_hook": WORKER_SETUP_HOOK}


def quiet_libraries() -> None:
    """Set warning filters, library log levels and progress bars off in this process. Idempotent; modules
    not imported yet are configured when they are (no library is imported here)."""
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    pattern = rf"({'|'.join(LIBRARIES)})(\.|$)"
    for category in (FutureWarning, DeprecationWarning, PendingDeprecationWarning):
        warnings.filterwarnings("ignore", category=category, module=pattern)
    for name in WARNING_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    after_import("mlflow", lambda _: logging.getLogger("mlflow").setLevel(logging.WARNING))  # sets its own
    for name in ERROR_LOGGERS:
        _add_filter_once(logging.getLogger(name), _AtLeast(logging.ERROR))
    for name, prefix in RAY_NOTICES.items():
        _add_filter_once(logging.getLogger(name), _DropPrefix(prefix))
    after_import("transformers.utils.logging", _quiet_hf_logging)
    after_import("diffusers.utils.logging", _quiet_hf_logging)
    after_import("huggingface_hub.utils", lambda m: m.disable_progress_bars())


def _quiet_hf_logging(module: ModuleType) -> None:
    """transformers / diffusers: errors only, no progress bars ("Writing model shards", "Loading
    checkpoint shards")."""
    module.set_verbosity_error()
    module.disable_progress_bar()


class _AtLeast(logging.Filter):
    def __init__(self, level: int) -> None:
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= self.level


class _DropPrefix(logging.Filter):
    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def _add_filter_once(logger: logging.Logger, new: logging.Filter) -> None:
    if not any(type(f) is type(new) and vars(f) == vars(new) for f in logger.filters):
        logger.addFilter(new)


# ------------------------------------------------------------------------------------ after import
class _ThenRun(importlib.abc.Loader):
    """A module's own loader, then the action registered for it (once)."""

    def __init__(self, loader: importlib.abc.Loader, actions: dict[str, Callable[[ModuleType], None]]) -> None:
        self.loader, self.actions = loader, actions

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self.loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self.loader.exec_module(module)
        action = self.actions.pop(module.__name__, None)
        if action is not None:
            action(module)

    def __getattr__(self, name: str):  # get_resource_reader, is_package, ...: the wrapped loader's
        return getattr(self.loader, name)


class _AfterImport(importlib.abc.MetaPathFinder):
    """Runs an action on a module right after its first import (a bare ``find_spec`` runs nothing)."""

    def __init__(self) -> None:
        self.actions: dict[str, Callable[[ModuleType], None]] = {}

    def find_spec(self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None):
        if fullname not in self.actions:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _ThenRun(spec.loader, self.actions)
                return spec
        return None


_AFTER_IMPORT = _AfterImport()


def after_import(name: str, action: Callable[[ModuleType], None]) -> None:
    """``action(module)`` now when ``name`` is imported, else right after its import."""
    if name in sys.modules:
        action(sys.modules[name])
        return
    _AFTER_IMPORT.actions[name] = action
    if _AFTER_IMPORT not in sys.meta_path:
        sys.meta_path.insert(0, _AFTER_IMPORT)
