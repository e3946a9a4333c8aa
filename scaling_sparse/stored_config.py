"""The config a workdir was trained with (WORKDIR/config.json), as a config file for absl's
`config_flags`: `--config=scaling_sparse/stored_config.py:WORKDIR`. The command line inserts this when
a command gets `--workdir` and no `--config` (cli.py), so eval, generate, params, train and compress
of a workdir need no config file, and `--config.FIELD=VALUE` overrides still apply."""

from __future__ import annotations

from scaling_sparse import storage
from scaling_sparse.config import ConfigError


def get_config(workdir: str):
    """The config stored in WORKDIR/config.json (`workdir` may also name a .json file written there)."""
    from scaling_sparse.checkpoint import CONFIG_FILE, load_saved_config

    path = storage.path(workdir)
    path = path if path.suffix == ".json" else path / CONFIG_FILE
    if not path.is_file():
        raise ConfigError(f"no --config was given and {path} does not exist. Fix: pass --config=FILE (e.g. "
                          "experiments/configs/stdlib.py), or a --workdir holding config.json from a training run")
    try:
        return load_saved_config(workdir)
    except ConfigError as e:
        raise ConfigError(f"{e}. It was left as it is. Fix: pass --config=FILE with the config the run was "
                          "trained with (e.g. experiments/configs/stdlib.py and its overrides)") from None
