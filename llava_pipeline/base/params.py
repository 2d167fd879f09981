"""Compose the Hydra config in conf/ into the dict that params.yaml holds.

`python -m llava_pipeline.params [overrides...]` rewrites params.yaml, e.g.
`python -m llava_pipeline.params model=llava-1.5-7b` to switch presets for a
plain `dvc repro` (`dvc exp run -S ...` does the same composition itself).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

import yaml

from llava_pipeline.base.config import ConfigError, from_dict, validate


def compose(conf_dir: Path, overrides: Sequence[str] = ()) -> dict:
    """The resolved config that Hydra composes from `conf_dir/config.yaml`."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        with initialize_config_dir(config_dir=str(conf_dir.resolve()), version_base=None):
            cfg = hydra_compose(config_name="config", overrides=list(overrides))
        data = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except (HydraException, OmegaConfBaseException) as e:
        raise ConfigError(f"conf/: {e}") from None
    assert isinstance(data, dict)  # Hydra composes a DictConfig
    validate(from_dict(data))
    return data


def dump(data: dict) -> str:
    return yaml.safe_dump(data, sort_keys=False)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        data = compose(Path("conf"), argv)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    Path("params.yaml").write_text(dump(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
