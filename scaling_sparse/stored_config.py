"""The config a workdir was trained with (WORKDIR/config.json), as a config file for absl's
`config_flags`: `--config=scaling_sparse/stored_config.py:WORKDIR`. The command line inserts this when
a command gets `--workdir` and no `--config` (cli.py), so eval, generate, params, train and compress
of a workdir need no config file, and `--config.FIELD=VALUE` overrides still apply."""

from __future__ import annotations

import json
import pathlib

from scaling_sparse.config import ConfigError


def get_config(workdir: str):
    from scaling_sparse.checkpoint import CONFIG_FILE, load_saved_config

    path = pathlib.Path(workdir) / CONFIG_FILE
    if not path.is_file():
        raise ConfigError(f"no --config was given and {path} does not exist. Fix: pass --config=FILE (e.g. "
                          "experiments/configs/stdlib.py), or a --workdir holding config.json from a training run")
    try:
        config = load_saved_config(workdir)
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError, ValueError) as e:
        raise ConfigError(f"{path} cannot be read as a config ({type(e).__name__}: {e}). It was left as it is. "
                          "Fix: pass --config=FILE with the config the run was trained with") from None
    if "model" not in config or "train" not in config:
        raise ConfigError(f"{path} has no model or train section. Fix: pass --config=FILE")
    return config
