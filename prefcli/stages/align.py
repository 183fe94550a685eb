"""`prefcli align --method M`: one entry point, one stage module per family of methods.

The method -> config class table is the stage registry's (prefcli/stages/__init__.py
METHODS); this module builds the method's config from the options the user gave
(refusing those that do not apply to it) and runs its stage.
"""

from __future__ import annotations

from prefcli.stages import METHODS, align_config, method_config, method_run  # noqa: F401  (METHODS: re-exported)
from prefcli.workspace import Workspace


def run(method: str, options: dict, config_file, ws: Workspace) -> dict:
    cfg = align_config(method, options, config_file)
    return method_run(method)(cfg, ws)
